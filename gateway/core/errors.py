"""The fixed reason codes of refused requests: the `reason` label of gateway_denied_total and
gateway_would_deny_total, and the audit line's code. Bounded and known up front, so that every
series exists from the first scrape and no label value comes from what a client sent."""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    # identity, checked on every request
    NO_CERTIFICATE = "no_certificate"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    REVOKED = "revoked"
    CRL_EXPIRED = "crl_expired"
    CRL_MISSING = "crl_missing"
    UNKNOWN_CA = "unknown_ca"
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


# The denials report mode lets through (403/404 by policy), the labels of gateway_would_deny_total.
POLICY_REASONS = (Reason.OPERATION_NOT_ALLOWED, Reason.SOLICITOR_NOT_ALLOWED, Reason.ORDER_NOT_VISIBLE,
                  Reason.ANONYMIZE_NOT_ALLOWED)
