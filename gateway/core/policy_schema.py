"""The JSON Schema of a policy file, built from the tables parse_policy() reads them with.

The keys, the match keys, the operations, the solicitor sources, the rate periods and the
client name's pattern come from core/policy.py and core/operations.py, so the schema an
editor validates a policy file with cannot name a key or a value the loader does not
take; tests/test_schema.py holds the two to the same verdict on good and bad files.
"""

from __future__ import annotations

from gateway.core.operations import ORDER_SCOPED, Operation
from gateway.core.policy import CLIENT_RE, MATCH_KEYS, PERIODS, POLICY_KEYS, SOURCES
from gateway.core.typed import DIALECT

_NON_EMPTY = {"type": "string", "minLength": 1}
_OPERATIONS = [op.value for op in Operation]
_MATCH_ABOUT = {
    "subject": "the certificate's subject, RFC 4514, exactly (CN=hr-system,O=Acme)",
    "issuer": "the issuing CA's subject, RFC 4514, exactly (CN=Partner CA,O=Acme), with another key: pins the "
              "client to one CA when tls.client_ca holds several",
    "common_name": "the subject's one common name",
    "san_dns": "a DNS name among the subjectAltNames",
    "san_uri": "a URI among the subjectAltNames (spiffe://acme/hr)",
    "san_email": "an e-mail address among the subjectAltNames",
    "fingerprint_sha256": "the certificate's SHA-256 fingerprint (64 hex digits, ':' allowed)",
}


def _rate(about: str) -> dict:
    periods = {p: {"type": "number", "exclusiveMinimum": 0, "description": f"requests {p.replace('_', ' a ')}"}
               for p in PERIODS}
    return {
        "type": "object", "additionalProperties": False, "description": about,
        "properties": {**periods, "burst": {"type": "integer", "minimum": 1,
                                            "description": "requests allowed at once (default: the rate)"}},
        "oneOf": [{"required": [p]} for p in PERIODS],
    }


def _needs(operations: list[str], key: str, why: str) -> dict:
    """When `allow` holds any of `operations`, `key` must be a non-empty list."""
    return {
        "if": {"required": ["allow"], "properties": {"allow": {"type": "array", "contains": {"enum": operations}}}},
        "then": {"required": [key], "properties": {key: {"type": "array", "minItems": 1}}},
        "$comment": why,
    }


def policy_schema() -> dict:
    """JSON Schema (2020-12) of policies/NAME.yaml."""
    value = {"anyOf": [_NON_EMPTY, {"type": "array", "minItems": 1, "items": _NON_EMPTY}]}
    match = {key: {**value, "description": about + "; a list matches any of its values"}
             for key, about in _MATCH_ABOUT.items()}
    fingerprint = {"type": "string", "pattern": r"^[\s:]*[0-9A-Fa-f](?::*[0-9A-Fa-f]){63}[\s:]*$"}
    match["fingerprint_sha256"] = {
        "anyOf": [fingerprint, {"type": "array", "minItems": 1, "items": fingerprint}],
        "description": match["fingerprint_sha256"]["description"]}
    client_limit = _rate("")["properties"]
    operations_limits = {"type": ["object", "null"], "additionalProperties": False,
                         "description": "a limit per operation, on top of the client's",
                         "properties": {op: _rate(f"the limit of {op}") for op in _OPERATIONS}}
    any_period = [{"required": [p]} for p in PERIODS]
    properties = {
        "client": {"type": "string", "pattern": f"^{CLIENT_RE.pattern}$(?!\n)",   # as fullmatch
                   "description": "the client's name: in the audit log, the metrics and the identity token"},
        "match": {"type": "object", "additionalProperties": False, "minProperties": 1, "properties": match,
                  "anyOf": [{"required": [k]} for k in MATCH_KEYS if k != "issuer"],   # issuer alone: any cert
                  "description": "the client's certificates: every key given must match"},
        "allow": {"type": "array", "items": {"enum": _OPERATIONS}, "description": "the operations it may call"},
        "solicitors": {
            "type": ["array", "null"], "description": "who it may create orders for and whose orders it sees",
            "items": {"type": "object", "additionalProperties": False, "required": ["source", "identifier"],
                      "properties": {"source": {"enum": list(SOURCES)},
                                     "identifier": {**_NON_EMPTY, "description": "a glob on the identifier"}}}},
        "anonymize": {"type": ["array", "null"], "items": _NON_EMPTY,
                      "description": "externalId globs it may anonymize (SOURCE:identifier); internalId and "
                                     "ldapSearch need \"*\""},
        "rate_limit": {
            "description": "{per_second|per_minute|per_hour: N, burst: B} for the client as a whole",
            "anyOf": [{"type": "null"}, {
                "type": "object", "additionalProperties": False,
                "properties": {**client_limit, "operations": operations_limits},
                # a limit of the client's own needs exactly one period; operations alone are fine
                "anyOf": [{"not": {"anyOf": [*any_period, {"required": ["burst"]}]}}, {"oneOf": any_period}]}]},
        "max_upload_bytes": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}],
                             "description": "the largest create_order body it may send"},
        "mode": {"enum": ["enforce", "report"], "default": "enforce",
                 "description": "report: would-be denials are audited and counted, not enforced"},
    }
    if set(match) != set(MATCH_KEYS) or set(properties) != set(POLICY_KEYS):  # pragma: no cover
        raise AssertionError("the policy schema and parse_policy name different keys")
    order_operations = sorted(op.value for op in ORDER_SCOPED | {Operation.CREATE_ORDER})
    return {
        "$schema": DIALECT, "title": "gateway policy file", "type": "object", "additionalProperties": False,
        "description": "One client: which certificates are it, what it may call, for whom.",
        "required": ["client", "match"], "properties": properties,
        "allOf": [_needs(order_operations, "solicitors", "order operations need solicitors"),
                  _needs([Operation.ANONYMIZE_USER.value], "anonymize", "anonymize_user needs anonymize globs")],
    }
