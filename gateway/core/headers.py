"""Header hygiene between the client and the upstream, as plain functions.

Requests: an allow-list. Only headers that describe the content or the
client's preferences go upstream; everything a client could use to claim an
identity, alter routing or framing (X-Forwarded-*, Forwarded, X-Client-*,
Client-Cert, the identity token, Authorization, method overrides, hop-by-hop
headers, Content-Length and Transfer-Encoding, which the gateway sets itself)
is dropped. Responses: hop-by-hop headers, including those named in
Connection, are removed.
"""

from __future__ import annotations

from typing import Iterable, Mapping

IDENTITY_TOKEN_HEADER = "X-Identity-Token"
REQUEST_ID_HEADER = "X-Request-ID"

FORWARDED_REQUEST_HEADERS = frozenset({
    "accept", "accept-language", "content-type", "user-agent", "if-none-match", "if-match",
    "if-modified-since", "if-unmodified-since", "cache-control", "pragma", "idempotency-key",
})
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
# Set by the gateway's own server for its answers.
SERVER_SET = frozenset({"server", "date", "content-length", REQUEST_ID_HEADER.lower()})


def upstream_request_headers(
    incoming: Iterable[tuple[str, str]], *, request_id: str, client_ip: str, token: str | None,
) -> dict[str, str]:
    """The headers sent upstream: the allowed ones from the client, then the gateway's own."""
    out: dict[str, str] = {}
    for name, value in incoming:
        key = name.lower()
        if key in FORWARDED_REQUEST_HEADERS and key not in out:
            out[key] = value
    out["x-forwarded-for"] = client_ip
    out["x-forwarded-proto"] = "https"
    out[REQUEST_ID_HEADER.lower()] = request_id
    if token is not None:
        out[IDENTITY_TOKEN_HEADER.lower()] = token
    return out


def client_response_headers(upstream: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The upstream's response headers without hop-by-hop ones (also those named in Connection)."""
    pairs = list(upstream)
    named = {
        token.strip().lower()
        for name, value in pairs if name.lower() == "connection"
        for token in value.split(",") if token.strip()
    }
    drop = HOP_BY_HOP | SERVER_SET | named
    return [(name, value) for name, value in pairs if name.lower() not in drop]


def has_body(headers: Mapping[str, str]) -> bool:
    """Whether the request declares a body (non-zero Content-Length, or any Transfer-Encoding)."""
    length = headers.get("Content-Length")
    return "Transfer-Encoding" in headers or (length is not None and length.strip() != "0")
