"""`gateway policy test`: tables of expected decisions, kept next to the policies and run in CI.

A test file (YAML, `policies/tests/*.yaml` by default) holds `cases`, each with:

    name:     what the case shows (optional; the case's index names it otherwise)
    identity: {cert: PEM file (relative to the test file)} or identity fields:
              {subject, issuer, common_name, san_dns, san_uri, san_email, fingerprint_sha256}
    request:  {method, path, form: {NAME: VALUE or [VALUES]}, fields: {...anonymize fields},
               order_solicitor: {source, identifier} or null (the order does not exist)}
    expect:   allow | {allow: true, would_deny: CODE} (report mode) | {deny: STATUS, reason: CODE}

Each case is decided by the same sequence the running gateway uses: the identity maps to
one policy (else 403 unknown_client), the method and path to an operation (else 404
no_operation), then core.decide.evaluate, answered with the case's values. So a test
can never disagree with `gateway serve`. The rules no case exercised (an allowed
operation, a solicitor glob, an anonymize glob) are listed, so that a reviewer sees
grants nobody tested.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.core.decide import NeedFields, NeedOrderSolicitor, evaluate, run
from gateway.core.errors import Reason, SettingsError
from gateway.core.identity import Identity, format_fingerprint, identity_from_der
from gateway.core.operations import route
from gateway.core.policy import Policy, PolicySet
from gateway.shell.settings import read_yaml

IDENTITY_FIELDS = ("subject", "issuer", "common_name", "san_dns", "san_uri", "san_email", "fingerprint_sha256")
REQUEST_KEYS = ("method", "path", "form", "fields", "order_solicitor")


@dataclass(frozen=True)
class Outcome:
    allow: bool
    status: int = 200
    reason: str | None = None          # the reason code of a denial
    would_deny: str | None = None      # report mode

    def __str__(self) -> str:
        if not self.allow:
            return f"deny {self.status} {self.reason}"
        return f"allow (would deny {self.would_deny})" if self.would_deny else "allow"


@dataclass(frozen=True)
class Case:
    file: str
    name: str
    identity: Identity
    method: str
    path: str
    form: dict[str, list[str]]
    order_solicitor: Any
    expect: Outcome


@dataclass
class Report:
    passed: int = 0
    failures: list[dict] = field(default_factory=list)
    untested: list[str] = field(default_factory=list)


# -- reading test files ---------------------------------------------------------------------------

def load_cases(paths: list[Path]) -> list[Case]:
    """Every case of the given files and folders (*.yaml in a folder); SettingsError names file and key."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.glob("*.yaml"))
        elif path.is_file():
            files.append(path)
        else:
            raise SettingsError(path, "", "no such test file or folder")
    if not files:
        raise SettingsError(paths[0] if paths else "", "", "holds no test files (*.yaml)")
    cases: list[Case] = []
    for f in files:
        data = read_yaml(f)
        if not isinstance(data, dict) or set(data) - {"cases"} or not isinstance(data.get("cases"), list) \
                or not data["cases"]:
            raise SettingsError(f, "cases", "must be a non-empty list of cases")
        cases += [_case(f, i, c) for i, c in enumerate(data["cases"])]
    return cases


def _case(f: Path, i: int, data: Any) -> Case:
    where = f"cases[{i}]"
    if not isinstance(data, dict) or set(data) - {"name", "identity", "request", "expect"}:
        raise SettingsError(f, where, "must be a mapping of name, identity, request, expect")
    name = data.get("name", where)
    if not isinstance(name, str):
        raise SettingsError(f, f"{where}.name", "must be text")
    for key in ("identity", "request", "expect"):
        if key not in data:
            raise SettingsError(f, f"{where}.{key}", "is missing")
    request = data["request"]
    if not isinstance(request, dict) or set(request) - set(REQUEST_KEYS):
        raise SettingsError(f, f"{where}.request", f"must be a mapping of {', '.join(REQUEST_KEYS)}")
    method, path = request.get("method"), request.get("path")
    if not isinstance(method, str) or not isinstance(path, str):
        raise SettingsError(f, f"{where}.request", "needs method and path")
    form: dict[str, list[str]] = {}
    for key in ("form", "fields"):
        values = request.get(key) or {}
        if not isinstance(values, dict):
            raise SettingsError(f, f"{where}.request.{key}", "must be a mapping of field names to values")
        for k, v in values.items():
            form.setdefault(str(k), []).extend(v if isinstance(v, list) else [v])
    order = request.get("order_solicitor", _MISSING)
    if order is not _MISSING and order is not None and not (isinstance(order, dict) and set(order) <= {
            "source", "identifier"}):
        raise SettingsError(f, f"{where}.request.order_solicitor", "must be {source, identifier} or null")
    return Case(_shown(f), name, _identity(f, f"{where}.identity", data["identity"]), method.upper(), path, form,
                order, _expect(f, f"{where}.expect", data["expect"]))


_MISSING = object()


def _shown(path: Path) -> str:
    """A test file as the user would name it: relative to the current folder when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _identity(f: Path, where: str, data: Any) -> Identity:
    if isinstance(data, dict) and set(data) == {"cert"}:
        pem = f.parent / str(data["cert"])
        try:
            cert = x509.load_pem_x509_certificate(pem.read_bytes())
        except (OSError, ValueError):
            raise SettingsError(f, f"{where}.cert", f"{pem} is not a readable PEM certificate") from None
        return identity_from_der(cert.public_bytes(serialization.Encoding.DER))
    if not isinstance(data, dict) or not data or set(data) - set(IDENTITY_FIELDS):
        raise SettingsError(f, where, f"must be {{cert: FILE}} or identity fields ({', '.join(IDENTITY_FIELDS)})")

    def many(key: str) -> tuple[str, ...]:
        value = data.get(key, [])
        return tuple(value if isinstance(value, list) else [value])

    fingerprint = data.get("fingerprint_sha256")
    if fingerprint is None:  # stands in for a certificate nobody else has
        fingerprint = format_fingerprint(hashlib.sha256(json.dumps(data, sort_keys=True).encode()).digest())
    return Identity(subject=str(data.get("subject", "")), common_name=data.get("common_name"),
                    san_dns=many("san_dns"), san_uri=many("san_uri"), san_email=many("san_email"),
                    fingerprint_sha256=str(fingerprint).upper(), serial="0", issuer=str(data.get("issuer", "")),
                    not_before=None, not_after=None)


def _expect(f: Path, where: str, data: Any) -> Outcome:
    if data == "allow":
        return Outcome(True)
    if isinstance(data, dict) and data.get("allow") is True and set(data) <= {"allow", "would_deny"}:
        return Outcome(True, would_deny=_code(f, f"{where}.would_deny", data.get("would_deny")))
    if isinstance(data, dict) and set(data) == {"deny", "reason"} and isinstance(data["deny"], int):
        return Outcome(False, data["deny"], _code(f, f"{where}.reason", data["reason"]))
    raise SettingsError(f, where, "must be allow, {allow: true, would_deny: CODE} or {deny: STATUS, reason: CODE}")


def _code(f: Path, where: str, value: Any) -> str | None:
    if value is None and where.endswith("would_deny"):
        return None
    try:
        return Reason(value).value
    except ValueError:
        raise SettingsError(f, where, f"{value!r} is no reason code ({', '.join(r.value for r in Reason)})") from None


# -- deciding ---------------------------------------------------------------------------------------

def decide(policies: PolicySet, case: Case) -> tuple[Outcome, Policy | None, dict | None]:
    """The outcome the gateway would give, the policy it was decided under, and the solicitor decided on."""
    policy, _ = policies.find(case.identity)
    if policy is None:
        return Outcome(False, 403, Reason.UNKNOWN_CLIENT.value), None, None
    rt = route(case.method, case.path)
    if rt is None:
        return Outcome(False, 404, Reason.NO_OPERATION.value), policy, None

    def answer(need):
        if isinstance(need, NeedFields):
            return {k: v for k, v in case.form.items() if need.names is None or k in need.names}
        assert isinstance(need, NeedOrderSolicitor)
        return None if case.order_solicitor is _MISSING else case.order_solicitor

    verdict = run(evaluate(policy, rt), answer)
    if not verdict.allow:
        return Outcome(False, verdict.status, verdict.code.value), policy, verdict.solicitor
    return Outcome(True, would_deny=verdict.would_deny.value if verdict.would_deny else None), policy, verdict.solicitor


def rules(policies: PolicySet) -> list[tuple[str, str, str]]:
    """Every grant of every policy: (client, kind, rule)."""
    out = []
    for p in policies.policies:
        out += [(p.client, "allow", op.value) for op in sorted(p.allow, key=lambda o: o.value)]
        out += [(p.client, "solicitor", f"{s.source}:{s.identifier}") for s in p.solicitors]
        out += [(p.client, "anonymize", g) for g in p.anonymize]
    return out


def exercised(policy: Policy, case: Case, solicitor: dict | None) -> set[tuple[str, str, str]]:
    """The grants of `policy` this case's decision used."""
    used = set()
    rt = route(case.method, case.path)
    if rt is None or rt.operation not in policy.allow:
        return used
    used.add((policy.client, "allow", rt.operation.value))
    if solicitor and isinstance(solicitor.get("source"), str) and isinstance(solicitor.get("identifier"), str):
        used |= {(policy.client, "solicitor", f"{s.source}:{s.identifier}") for s in policy.solicitors
                 if s.matches(solicitor["source"], solicitor["identifier"])}
    external = case.form.get("externalId")
    if rt.operation.value == "anonymize_user":
        if external and isinstance(external[0], str):
            used |= {(policy.client, "anonymize", g) for g in policy.anonymize if fnmatch.fnmatchcase(external[0], g)}
        elif case.form.get("internalId") or case.form.get("ldapSearch"):
            used |= {(policy.client, "anonymize", g) for g in policy.anonymize if g == "*"}
    return used


def run_cases(policies: PolicySet, cases: list[Case]) -> Report:
    report = Report()
    used: set[tuple[str, str, str]] = set()
    for case in cases:
        outcome, policy, solicitor = decide(policies, case)
        if policy is not None:
            used |= exercised(policy, case, solicitor)
        if outcome == case.expect:
            report.passed += 1
        else:
            report.failures.append({"file": case.file, "case": case.name, "expected": str(case.expect),
                                    "actual": str(outcome)})
    report.untested = [f"{client}: {kind} {rule}" for client, kind, rule in rules(policies)
                       if (client, kind, rule) not in used]
    return report


def render(report: Report, fmt: str) -> str:
    if fmt == "json":
        return json.dumps({"passed": report.passed, "failed": len(report.failures), "failures": report.failures,
                           "untested": report.untested}, indent=2)
    lines = [f"FAIL {f['file']}: {f['case']}: expected {f['expected']}, got {f['actual']}" for f in report.failures]
    lines.append(f"{report.passed} passed, {len(report.failures)} failed")
    if report.untested:
        lines.append("rules no case exercised:")
        lines += [f"  {rule}" for rule in report.untested]
    return "\n".join(lines)
