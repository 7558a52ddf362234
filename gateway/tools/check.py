"""`gateway check` and `gateway policy explain`: answers without starting anything.

check: every problem of the config file, the policy files, the TLS files, the
keys and the storage settings, one line each, naming file and key.
explain: which client a certificate maps to, and the decision the gateway
would take on a request, from the same core functions the pipeline calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.shell.audit_writer import load_key
from gateway.core.decide import UNKNOWN, NeedFields, evaluate, run
from gateway.core.errors import SettingsError
from gateway.core.identity import Identity, identity_from_der
from gateway.core.operations import route
from gateway.core.policy import PolicySet
from gateway.core.strictjson import json_value
from gateway.shell.keys import readable_by_others
from gateway.shell.limits import storage_from_url
from gateway.shell.settings import Config, check_policies, load_config, load_policies
from gateway.shell.tls import check_crl, crl_is_stale, example_keys_exposed, load_crls, server_context
from gateway.shell.token import TokenIssuer, configured_key
from gateway.core.x509_rules import broken_rules

EXPIRY_WARNING_DAYS = 14


def check(config_file: str | None) -> tuple[list[str], list[str]]:
    """(problems, warnings) of a configuration and everything it names."""
    try:
        config = load_config(config_file)
    except SettingsError as exc:
        return [str(exc)], []
    where = str(config.file)
    if config.policies.is_dir():
        problems: list[str] = [str(p) for p in check_policies(config.policies)]
    else:
        problems = [f"{where}: policies: {config.policies} is not a folder of policy files"]
    warnings: list[str] = []
    try:
        server_context(config)
        facts = check_crl(config)
        if crl_is_stale(facts, time.time()):
            problems.append(f"{where}: tls.crl: {config.tls.crl} is past its nextUpdate: every client would be refused")
    except SettingsError as exc:
        problems.append(str(exc))
    for key, path in (("tls.key_password_file", config.tls.key_password_file),
                      ("identity_token.key_password_file",
                       config.identity_token.key_password_file if config.identity_token else None)):
        if readable_by_others(path):
            warnings.append(f"{where}: {key}: {path} can be read by others than its owner (chmod 600 it)")
    warnings += [f"{where}: listen.host: {why}" for why in example_keys_exposed(config)]
    trust_problems, trust_warnings = _trust(config, time.time())
    problems += trust_problems
    warnings += trust_warnings
    if config.identity_token is not None:
        key = config.identity_token.key
        if key is None:
            problems.append(f"{where}: identity_token.key: is required")
        elif key.exists():
            try:
                TokenIssuer(configured_key(config.identity_token, where), config.identity_token.audience,
                            config.identity_token.ttl_s)
            except SettingsError as exc:
                problems.append(str(exc))
            except (OSError, ValueError) as exc:
                problems.append(f"{where}: identity_token.key: {exc}")
        else:
            warnings.append(f"{where}: identity_token.key: {key} does not exist yet; it is created on first start")
    try:
        load_key(config.audit.key_file)
    except (OSError, ValueError) as exc:
        problems.append(f"{where}: audit.key_file: {exc}")
    if config.audit.key_file is None:
        warnings.append(f"{where}: audit.key_file: not set: the audit chain then shows accidents, not tampering "
                        "(anyone who can write the log can recompute it); keep a key away from the log")
    elif config.audit.key_file.resolve().parent == config.audit.path.resolve().parent:
        warnings.append(f"{where}: audit.key_file: {config.audit.key_file} is in the audit log's own folder: "
                        "whoever can write the log can read the key and recompute the chain")
    if not config.audit.path.parent.exists():
        warnings.append(f"{where}: audit.path: {config.audit.path.parent} does not exist yet; it is created on start")
    try:
        storage_from_url(config.rate_limit.storage)
    except ValueError as exc:
        problems.append(f"{where}: rate_limit.storage: {exc}")
    if config.upstream.url == "embedded" and config.reference_api.directory is not None \
            and not config.reference_api.directory.is_file():
        problems.append(f"{where}: reference_api.directory: {config.reference_api.directory} does not exist")
    return problems, warnings


def _read_certs(path: Path | None) -> list[x509.Certificate]:
    if path is None or not Path(path).is_file():
        return []
    try:
        return x509.load_pem_x509_certificates(Path(path).read_bytes())
    except ValueError:
        return []  # server_context has said what is wrong with the file


def _read_crls(path: Path | None) -> list[x509.CertificateRevocationList]:
    if path is None or not Path(path).is_file():
        return []
    return load_crls(path, strict=False)  # what does not parse, check_crl has reported


def _issued_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    return crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key())


def _trust(config: Config, now: float) -> tuple[list[str], list[str]]:
    """What would lock clients out: expiry, CRLs that fit no CA, CAs without the CRL they need, strictness."""
    problems, warnings = [], []
    where, tls = config.file, config.tls
    soon = now + EXPIRY_WARNING_DAYS * 86400
    cas = _read_certs(tls.client_ca)
    for key, certs in (("cert", _read_certs(tls.cert)), ("client_ca", cas)):
        for cert in certs:
            name, end = cert.subject.rfc4514_string(), cert.not_valid_after_utc
            if end.timestamp() < now:
                problems.append(f"{where}: tls.{key}: {name} expired on {end:%Y-%m-%d}")
            elif end.timestamp() < soon:
                warnings.append(f"{where}: tls.{key}: {name} expires {end:%Y-%m-%d}")
    if tls.crl is None:
        crls = []
    else:
        crls = _read_crls(tls.crl)
    for crl in crls:
        issuer = crl.issuer.rfc4514_string()
        due = crl.next_update_utc
        if not any(_issued_by(crl, ca) for ca in cas):
            problems.append(f"{where}: tls.crl: the CRL of {issuer} was issued by no CA in tls.client_ca "
                            "(a leftover?): it vouches for no client")
        elif due is not None and now <= due.timestamp() < soon:
            warnings.append(f"{where}: tls.crl: the CRL of {issuer} is due for renewal by {due:%Y-%m-%d %H:%M} UTC; "
                            "past it every client of that CA is refused")
    if tls.crl is not None and crls:
        issuers_of_cas = {ca.issuer for ca in cas if ca.issuer != ca.subject}
        for ca in cas:
            if any(_issued_by(crl, ca) for crl in crls):
                continue
            name = ca.subject.rfc4514_string()
            if tls.crl_check == "chain":
                continue  # check_crl has named it already
            if ca.subject in issuers_of_cas:
                warnings.append(f"{where}: tls.crl: no CRL of {name}: clients it issues directly would be refused "
                                "(crl_check: leaf needs the CRL of each client's issuer)")
            else:
                problems.append(f"{where}: tls.crl: no CRL of {name}: every client it issued would be refused "
                                "(crl_check: leaf needs the CRL of each client's issuer)")
    for ca in cas:
        broken = broken_rules(ca, trust_anchor=ca.subject == ca.issuer)
        if not broken:
            continue
        line = f"{where}: tls.client_ca: {ca.subject.rfc4514_string()} breaks RFC 5280: {'; '.join(broken)}"
        if tls.x509_strict:
            problems.append(line + " (tls.x509_strict refuses its clients)")
        else:
            warnings.append(line + " (accepted; tls.x509_strict: true would refuse its clients)")
    return problems, warnings


@dataclass(frozen=True)
class Explanation:
    lines: list[str]
    allowed: bool


def explain(config_file: str | None, cert_pem: Path, method: str, path: str,
            form: list[tuple[str, str]]) -> Explanation:
    """What the gateway would decide, without sending anything: core.decide driven with --form values."""
    config = load_config(config_file)
    policies: PolicySet = load_policies(config.policies)
    identity = _identity(cert_pem)
    lines = [f"certificate: {identity.subject} (issuer {identity.issuer}, serial {identity.serial})",
             f"fingerprint_sha256: {identity.fingerprint_sha256}"]
    policy, why = policies.find(identity)
    if policy is None:
        return Explanation(lines + [f"client: none ({why})", "decision: deny 403"], False)
    lines.append(f"client: {policy.client} ({policy.file}, mode {policy.mode})")
    rt = route(method.upper(), path)
    if rt is None:
        return Explanation(lines + [f"operation: none ({method.upper()} {path} is no operation)",
                                    "decision: deny 404"], False)
    lines.append(f"operation: {rt.operation.value}" + (f" (order {rt.order_id})" if rt.order_id else ""))
    fields: dict[str, list[str]] = {}
    for name, value in form:
        fields.setdefault(name, []).append(value)

    def answer(need):
        if isinstance(need, NeedFields):
            return {k: v for k, v in fields.items() if need.names is None or k in need.names}
        given = fields.get("solicitor")  # NeedOrderSolicitor: --form solicitor=JSON stands for the order's
        if not given:
            lines.append("order scope: the order's solicitor is looked up from the upstream at request time; "
                         "give it with --form solicitor=JSON to check it here")
            return UNKNOWN
        value = json_value(given[0])
        return value if isinstance(value, dict) else None

    verdict = run(evaluate(policy, rt), answer)
    if verdict.would_deny:
        lines.append(f"decision: allow (report mode; would deny {verdict.would_deny_status}: "
                     f"{verdict.reason.removeprefix('would deny: ')})")
        return Explanation(lines, True)
    lines.append(f"decision: {'allow' if verdict.allow else f'deny {verdict.status}'}: {verdict.reason}")
    return Explanation(lines, verdict.allow)


def _identity(cert_pem: Path) -> Identity:
    try:
        data = Path(cert_pem).read_bytes()
    except OSError as exc:
        raise SettingsError(cert_pem, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise SettingsError(cert_pem, "", "is not a PEM certificate") from None
    return identity_from_der(cert.public_bytes(serialization.Encoding.DER))
