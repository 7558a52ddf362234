"""The gateway's three kinds of error, each carrying what its handler needs from where it is raised.

- `Refusal`: a request is answered with a problem instead of going on. It carries
  the HTTP status, a fixed `Reason` code and the detail for the client, so no
  catch site re-maps it (as h11's ProtocolError carries its own status hint).
- `SettingsError`: a settings file (config.yaml, a policy file, a TLS file named in
  config.yaml) cannot be used: `file: key: message`, one line.
- `StartError`: the gateway cannot start (a port taken, a child that does not come
  up); one line saying why.

`Reason` codes are metric labels the README calls fixed: bounded, known up front,
never taken from what a client sent.
"""

from __future__ import annotations

import os
from enum import StrEnum


class Reason(StrEnum):
    # identity, checked on every request
    NO_CERTIFICATE = "no_certificate"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    REVOKED = "revoked"
    CRL_EXPIRED = "crl_expired"
    CRL_MISSING = "crl_missing"
    UNKNOWN_CA = "unknown_ca"
    REVOCATION_UNAVAILABLE = "revocation_unavailable"   # tls.revocation could not learn a status (on_unavailable: deny)
    UNKNOWN_CLIENT = "unknown_client"
    # the request itself
    NO_OPERATION = "no_operation"
    BAD_HTTP = "bad_http"
    BAD_EXPECT = "bad_expect"
    BAD_REQUEST = "bad_request"
    BAD_BODY = "bad_body"
    BODY_TOO_LARGE = "body_too_large"
    BAD_SOLICITOR = "bad_solicitor"
    BAD_ANONYMIZE = "bad_anonymize"
    # policy
    OPERATION_NOT_ALLOWED = "operation_not_allowed"
    SOLICITOR_NOT_ALLOWED = "solicitor_not_allowed"
    ORDER_NOT_VISIBLE = "order_not_visible"
    ANONYMIZE_NOT_ALLOWED = "anonymize_not_allowed"
    RATE_LIMITED = "rate_limited"
    # the gateway or what it depends on
    AUDIT_UNAVAILABLE = "audit_unavailable"
    RATELIMIT_STORAGE = "ratelimit_storage"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    TIMEOUT = "timeout"
    INTERNAL = "internal"
    CLIENT_GONE = "client_gone"
    CANCELLED = "cancelled"


# A certificate that no longer holds: the connection is closed, and the request is nobody's.
CREDENTIAL_REASONS = frozenset({Reason.NO_CERTIFICATE, Reason.EXPIRED, Reason.NOT_YET_VALID, Reason.REVOKED,
                                Reason.CRL_EXPIRED, Reason.CRL_MISSING, Reason.UNKNOWN_CA,
                                Reason.REVOCATION_UNAVAILABLE})

# The denials report mode lets through (403/404 by policy): the labels of gateway_would_deny_total.
POLICY_REASONS = (Reason.OPERATION_NOT_ALLOWED, Reason.SOLICITOR_NOT_ALLOWED, Reason.ORDER_NOT_VISIBLE,
                  Reason.ANONYMIZE_NOT_ALLOWED)


class Refusal(Exception):
    """Answer with a problem: `status`, the fixed `code`, the `detail` the client reads.

    `headers` go on the answer (Retry-After, RateLimit-*); `close` ends the connection
    after it (a credential that no longer holds, a body that was not read). `cause` is for
    the operational log only (why the upstream failed, say), never for the client.
    """

    def __init__(self, status: int, code: Reason, detail: str, *, headers: dict[str, str] | None = None,
                 close: bool = False, cause: str | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers, self.close = status, code, detail, headers, close
        self.cause = cause


class SettingsError(Exception):
    """A settings file cannot be used: `file: key: message` on one line."""

    def __init__(self, file: str | os.PathLike, key: str, message: str):
        self.file, self.key, self.message = str(file), key, message
        super().__init__(f"{file}: {key}: {message}" if key else f"{file}: {message}")


class StartError(Exception):
    """The gateway cannot start; one line saying why."""
