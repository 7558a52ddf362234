"""Client policies: a parsed policy document -> Policy; identity -> policy; decisions.

Reading policies/*.yaml is shell/settings.py's; this module gets the parsed data.

Deny unless a policy allows. A certificate that matches no policy is nobody,
and so is one that matches more than one (policies that share a value are
refused when the folder is loaded: core/overlaps.py). Every decision carries a
reason that goes to the client (as problem detail), the audit log and
`policy explain`.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Any

from gateway.core.errors import Reason, SettingsError
from gateway.core.identity import Identity
from gateway.core.operations import ORDER_SCOPED, Operation
from gateway.core.typed import whole

MATCH_KEYS = ("subject", "issuer", "common_name", "san_dns", "san_uri", "san_email", "fingerprint_sha256")
POLICY_KEYS = ("client", "match", "allow", "solicitors", "anonymize", "rate_limit", "max_upload_bytes", "mode")
CLIENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SOURCES = ("INTERNAL", "EXTERNAL")
PERIODS = {"per_second": 1.0, "per_minute": 60.0, "per_hour": 3600.0}



@dataclass(frozen=True)
class Rate:
    """`rate` requests per second on average, bursts of up to `burst`."""

    rate: float
    burst: int


@dataclass(frozen=True)
class RateLimits:
    client: Rate | None = None
    operations: dict[Operation, Rate] = field(default_factory=dict)


@dataclass(frozen=True)
class Solicitor:
    source: str
    identifier: str  # a glob

    def matches(self, source: str, identifier: str) -> bool:
        return source == self.source and fnmatch.fnmatchcase(identifier, self.identifier)


_LEAF_ISSUER = object()   # Policy.matches without a verified issuer: the certificate's own issuer field


@dataclass(frozen=True)
class Policy:
    client: str
    file: str
    match: tuple[tuple[str, tuple[str, ...]], ...]   # every key must match; a value list is any-of
    allow: frozenset[Operation]
    solicitors: tuple[Solicitor, ...] = ()
    anonymize: tuple[str, ...] = ()
    rate_limit: RateLimits = field(default_factory=RateLimits)
    max_upload_bytes: int | None = None
    mode: str = "enforce"

    def matches(self, identity: Identity, issuer: str | None | object = _LEAF_ISSUER) -> bool:
        """Whether the certificate is this client's. `issuer`: the DN of the CA of tls.client_ca that
        verifiably signed it (None: none did, so no `issuer` pin holds); left out, the certificate's own
        issuer field stands for it (offline tools that have no chain)."""
        verified = identity.issuer if issuer is _LEAF_ISSUER else issuer
        return all(_match_one(key, values, identity, verified) for key, values in self.match)

    def may_act_for(self, source: Any, identifier: Any) -> bool:
        if not isinstance(source, str) or not isinstance(identifier, str):
            return False
        return any(s.matches(source, identifier) for s in self.solicitors)

    def may_anonymize(self, external_id: str | None) -> bool:
        """externalId SOURCE:identifier against the globs; internalId and ldapSearch need "*"."""
        if external_id is None:
            return "*" in self.anonymize
        return any(fnmatch.fnmatchcase(external_id, g) for g in self.anonymize)


def _match_one(key: str, values: tuple[str, ...], identity: Identity, issuer: str | None) -> bool:
    if key == "subject":
        return identity.subject in values
    if key == "issuer":
        # never the issuer field alone: any CA of the bundle could sign an intermediate of that name
        return issuer is not None and issuer in values
    if key == "common_name":
        return identity.common_name is not None and identity.common_name in values
    if key == "fingerprint_sha256":
        return identity.fingerprint_sha256 in values
    have = {"san_dns": identity.san_dns, "san_uri": identity.san_uri, "san_email": identity.san_email}[key]
    return any(v in have for v in values)


# -- decisions ----------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    allow: bool
    status: int          # the status to answer when denied
    reason: str
    code: Reason | None = None  # the fixed reason code of a denial (a metrics label)

    @classmethod
    def ok(cls, reason: str = "allowed by policy") -> "Decision":
        return _ALLOWED if reason == "allowed by policy" else cls(True, 200, reason)


_ALLOWED = Decision(True, 200, "allowed by policy")   # immutable: one for every plain allow


def deny(status: int, reason: str, code: Reason) -> Decision:
    return Decision(False, status, reason, code)


def decide_operation(policy: Policy, operation: Operation) -> Decision:
    if operation not in policy.allow:
        return deny(403, f"operation {operation.value} is not allowed for client {policy.client}", Reason.OPERATION_NOT_ALLOWED)
    return Decision.ok()


def decide_solicitor(policy: Policy, values: list[Any]) -> Decision:
    """create_order: the parsed `solicitor` field values (JSON already decoded, or an Exception)."""
    if not values:
        return deny(400, "solicitor: is missing", Reason.BAD_SOLICITOR)
    if len(values) > 1:
        return deny(400, "solicitor: must appear once, not repeated", Reason.BAD_SOLICITOR)
    value = values[0]
    if isinstance(value, Exception):
        return deny(400, f"solicitor: is not valid JSON ({value})", Reason.BAD_SOLICITOR)
    if not isinstance(value, dict):
        return deny(400, "solicitor: must be a JSON object", Reason.BAD_SOLICITOR)
    source, identifier = value.get("source"), value.get("identifier")
    if not policy.may_act_for(source, identifier):
        return deny(403, f"solicitor {source}:{identifier} is not one of client {policy.client}'s solicitors",
                    Reason.SOLICITOR_NOT_ALLOWED)
    return Decision.ok(f"solicitor {source}:{identifier} allowed")


def decide_order_scope(policy: Policy, solicitor: dict | None) -> Decision:
    """Order operations: the order's solicitor, as the upstream stores it, must be the client's."""
    if solicitor is None or not policy.may_act_for(solicitor.get("source"), solicitor.get("identifier")):
        return deny(404, "no such order for this client", Reason.ORDER_NOT_VISIBLE)
    return Decision.ok(f"order of solicitor {solicitor.get('source')}:{solicitor.get('identifier')}")


def decide_anonymize(policy: Policy, fields: dict[str, list[Any]]) -> Decision:
    given = [n for n in ("internalId", "externalId", "ldapSearch") if fields.get(n)]
    unknown = set(fields) - {"internalId", "externalId", "ldapSearch"}
    if unknown:
        return deny(400, f"{sorted(unknown)[0]}: is not a field of POST /anonymize", Reason.BAD_ANONYMIZE)
    if len(given) != 1:
        return deny(400, "give exactly one of internalId, externalId, ldapSearch", Reason.BAD_ANONYMIZE)
    values = fields[given[0]]
    if len(values) > 1:
        return deny(400, f"{given[0]}: must appear once, not repeated", Reason.BAD_ANONYMIZE)
    if given[0] == "externalId":
        if not isinstance(values[0], str):
            return deny(400, "externalId: must be SOURCE:identifier", Reason.BAD_ANONYMIZE)
        target = values[0]
        allowed = policy.may_anonymize(target)
    else:
        target = given[0]
        allowed = policy.may_anonymize(None)
    if not allowed:
        return deny(403, f"anonymizing by {target} is not allowed for client {policy.client}", Reason.ANONYMIZE_NOT_ALLOWED)
    return Decision.ok(f"anonymize {target} allowed")


# -- the policy set -----------------------------------------------------------


class PolicySet:
    def __init__(self, policies: list[Policy]):
        self.policies = tuple(policies)
        self.by_client = {p.client: p for p in self.policies}
        self._found: dict[tuple[str, object], tuple[Policy | None, str]] = {}

    def find(self, identity: Identity, issuer: str | None | object = _LEAF_ISSUER) -> tuple[Policy | None, str]:
        """The one policy matching the identity, or None and why (remembered per certificate and issuer).

        `issuer` as in Policy.matches: the gateway passes the DN of the CA of tls.client_ca whose
        signature on the certificate it verified."""
        key = (identity.fingerprint_sha256, issuer)
        found = self._found.get(key)
        if found is None:
            if len(self._found) > 10000:
                self._found.clear()
            found = self._found[key] = self._find(identity, issuer)
        return found

    def _find(self, identity: Identity, issuer) -> tuple[Policy | None, str]:
        found = [p for p in self.policies if p.matches(identity, issuer)]
        if not found:
            return None, "the certificate matches no client policy"
        if len(found) > 1:
            names = ", ".join(sorted(p.client for p in found))
            return None, f"the certificate matches more than one client policy ({names})"
        return found[0], f"client {found[0].client}"


def parse_policy(data: Any, path: str) -> Policy:
    def err(key: str, message: str) -> SettingsError:
        return SettingsError(path, key, message)

    if not isinstance(data, dict):
        raise err("", "must be a mapping")
    for key in data:
        if key not in POLICY_KEYS:
            raise err(str(key), "unknown key")
    client = data.get("client")
    if not isinstance(client, str) or not CLIENT_RE.fullmatch(client):
        raise err("client", "must be a name of letters, digits, '.', '_' or '-'")
    match = data.get("match")
    if not isinstance(match, dict) or not match:
        raise err("match", f"must be a mapping with at least one of {', '.join(MATCH_KEYS)}")
    parsed_match = []
    for key, value in match.items():
        if key not in MATCH_KEYS:
            raise err(f"match.{key}", "unknown key")
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) and v for v in values):
            raise err(f"match.{key}", "must be a non-empty string or list of strings")
        if key == "fingerprint_sha256":
            values = [_fingerprint(v, err) for v in values]
        parsed_match.append((key, tuple(values)))
    if set(match) == {"issuer"}:
        raise err("match.issuer", "cannot be the only key: it would match every certificate the CA issues "
                                  "(give it with subject, common_name, a SAN or fingerprint_sha256)")
    allow = data.get("allow", [])
    if not isinstance(allow, list):
        raise err("allow", "must be a list of operations")
    ops = set()
    for i, name in enumerate(allow):
        try:
            ops.add(Operation(name))
        except ValueError:
            raise err(f"allow[{i}]", f"unknown operation {name!r}") from None
    if not isinstance(data.get("solicitors", []), (list, type(None))):
        raise err("solicitors", "must be a list")
    solicitors = []
    for i, s in enumerate(data.get("solicitors") or []):
        if not isinstance(s, dict) or set(s) != {"source", "identifier"}:
            raise err(f"solicitors[{i}]", "must be {source: INTERNAL|EXTERNAL, identifier: GLOB}")
        if s["source"] not in SOURCES:
            raise err(f"solicitors[{i}].source", "must be INTERNAL or EXTERNAL")
        if not isinstance(s["identifier"], str) or not s["identifier"]:
            raise err(f"solicitors[{i}].identifier", "must be a non-empty glob")
        solicitors.append(Solicitor(s["source"], s["identifier"]))
    if (ops & (ORDER_SCOPED | {Operation.CREATE_ORDER})) and not solicitors:
        raise err("solicitors", "is empty: order operations are allowed but no solicitor is")
    anonymize = data.get("anonymize")
    if anonymize is None:
        anonymize = []
    if not isinstance(anonymize, list) or not all(isinstance(g, str) and g for g in anonymize):
        raise err("anonymize", "must be a list of externalId globs")
    if Operation.ANONYMIZE_USER in ops and not anonymize:
        raise err("anonymize", "is empty: anonymize_user is allowed but nobody may be anonymized")
    max_upload = data.get("max_upload_bytes")
    if max_upload is not None:
        max_upload = whole(max_upload)
        if max_upload is None or max_upload < 1:
            raise err("max_upload_bytes", "must be a positive integer")
    mode = data.get("mode", "enforce")
    if mode not in ("enforce", "report"):
        raise err("mode", "must be enforce or report")
    return Policy(
        client=client, file=str(path), match=tuple(parsed_match), allow=frozenset(ops),
        solicitors=tuple(solicitors), anonymize=tuple(anonymize),
        rate_limit=_parse_rate_limit(data.get("rate_limit"), err), max_upload_bytes=max_upload, mode=mode,
    )


def _fingerprint(value: str, err) -> str:
    hexdigits = value.replace(":", "").strip()
    if not re.fullmatch(r"[0-9A-Fa-f]{64}", hexdigits):
        raise err("match.fingerprint_sha256", "must be a SHA-256 fingerprint (64 hex digits, ':' allowed)")
    return ":".join(hexdigits[i:i + 2].upper() for i in range(0, 64, 2))


def _parse_rate(data: Any, key: str, err) -> Rate:
    if not isinstance(data, dict):
        raise err(key, "must be a mapping like {per_second: 10, burst: 20}")
    periods = [p for p in PERIODS if p in data]
    unknown = set(data) - set(PERIODS) - {"burst"}
    if unknown:
        raise err(f"{key}.{sorted(unknown)[0]}", "unknown key")
    if len(periods) != 1:
        raise err(key, "needs exactly one of per_second, per_minute, per_hour")
    count = data[periods[0]]
    if isinstance(count, bool) or not isinstance(count, (int, float)) or not math.isfinite(count) or count <= 0:
        raise err(f"{key}.{periods[0]}", "must be a positive number")
    burst = whole(data["burst"]) if "burst" in data else max(1, int(count))
    if burst is None or burst < 1:
        raise err(f"{key}.burst", "must be a positive integer")
    return Rate(rate=count / PERIODS[periods[0]], burst=burst)


def _parse_rate_limit(data: Any, err) -> RateLimits:
    if data is None:
        return RateLimits()
    if not isinstance(data, dict):
        raise err("rate_limit", "must be a mapping")
    ops_data = data.get("operations")
    if ops_data is None:
        ops_data = {}
    client_part = {k: v for k, v in data.items() if k != "operations"}
    client = _parse_rate(client_part, "rate_limit", err) if client_part else None
    if not isinstance(ops_data, dict):
        raise err("rate_limit.operations", "must be a mapping of operation to limit")
    operations = {}
    for name, limit in ops_data.items():
        try:
            op = Operation(name)
        except ValueError:
            raise err(f"rate_limit.operations.{name}", "unknown operation") from None
        operations[op] = _parse_rate(limit, f"rate_limit.operations.{name}", err)
    return RateLimits(client=client, operations=operations)
