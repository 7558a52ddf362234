"""RFC 9457 problem details: the one error shape of every HTTP answer we make.

Plain data in, bytes out, so both the gateway and the reference API use it
without sharing anything else. No exception text or traceback ever goes in.
"""

from __future__ import annotations

import json
from http import HTTPStatus

CONTENT_TYPE = "application/problem+json"
TYPE_BASE = "urn:gateway:problem:"
# The kind of problem (its `type`) of each status the gateway answers with.
SLUGS = {400: "bad-request", 403: "forbidden", 404: "not-found", 408: "request-timeout", 413: "body-too-large",
         415: "unsupported-media-type", 417: "expectation-failed", 429: "rate-limited", 500: "internal",
         502: "bad-gateway", 503: "unavailable", 504: "gateway-timeout", 505: "http-version-not-supported"}


def slug_of(status: int) -> str:
    return SLUGS.get(status, "denied" if 400 <= status < 500 else "error")


def problem(status: int, slug: str, detail: str, request_id: str | None = None, **extra) -> dict:
    """A problem document; `slug` names the kind of problem (its `type`)."""
    body = {
        "type": TYPE_BASE + slug,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "request_id": request_id,
    }
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


def problem_bytes(status: int, slug: str, detail: str, request_id: str | None = None, **extra) -> bytes:
    return json.dumps(problem(status, slug, detail, request_id, **extra)).encode()
