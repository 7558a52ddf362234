"""gateway.core.headers: the request allow-list, response hop-by-hop removal, has_body."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from gateway.core.headers import (FORWARDED_REQUEST_HEADERS, IDENTITY_TOKEN_HEADER, REQUEST_ID_HEADER,
                             client_response_headers, has_body, upstream_request_headers)

DROPPED = [
    ("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", "evil"),
    ("X-Forwarded-Prefix", "/admin"), ("x-forwarded-client-cert", "Subject=CN=admin"),
    ("Forwarded", "for=6.6.6.6;proto=http"), ("X-Client-Cert", "MIIB..."), ("X-Client-DN", "CN=hr-system"),
    ("x-client-verify", "SUCCESS"), ("Client-Cert", ":MIIB:"), ("Client-Cert-Chain", ":MIIB:"),
    ("X-Identity-Token", "forged.jwt.token"), ("x-identity-token", "forged2"),
    ("Authorization", "Bearer x"), ("Proxy-Authorization", "Basic x"), ("Cookie", "a=b"),
    ("Host", "upstream.internal"), ("Content-Length", "5"), ("Transfer-Encoding", "chunked"),
    ("Connection", "keep-alive, X-Foo"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
    ("Upgrade", "websocket"), ("Trailer", "X-Foo"), ("Proxy-Connection", "keep-alive"),
    ("X-HTTP-Method-Override", "DELETE"), ("X-HTTP-Method", "DELETE"), ("X-Method-Override", "DELETE"),
    ("X-Original-URL", "/anonymize"), ("X-Rewrite-URL", "/anonymize"), ("X-Real-IP", "6.6.6.6"),
    ("True-Client-IP", "6.6.6.6"), ("X-Request-ID", "client-chosen"), ("Expect", "100-continue"),
    ("Content-Encoding", "gzip"), ("X-Foo", "bar"), ("Via", "1.1 evil"), ("Max-Forwards", "0"),
]
KEPT = [
    ("Accept", "application/json"), ("Accept-Language", "sv"), ("Content-Type", "multipart/form-data; boundary=b"),
    ("User-Agent", "hr/1.0"), ("If-None-Match", '"e"'), ("If-Match", '"f"'),
    ("If-Modified-Since", "Wed, 21 Oct 2015 07:28:00 GMT"), ("If-Unmodified-Since", "Wed, 21 Oct 2015 07:28:00 GMT"),
    ("Cache-Control", "no-cache"), ("Pragma", "no-cache"), ("Idempotency-Key", "k-1"),
]


def _up(incoming, token="tok.en.jwt"):
    return upstream_request_headers(incoming, request_id="rid-1", client_ip="10.0.0.7", token=token)


def test_allow_list_only():
    out = _up(DROPPED + KEPT)
    gateway_own = {"x-forwarded-for", "x-forwarded-proto", "x-request-id", "x-identity-token"}
    assert set(out) == {k.lower() for k, _ in KEPT} | gateway_own
    for name, value in KEPT:
        assert out[name.lower()] == value
    assert {k.lower() for k, _ in KEPT} == FORWARDED_REQUEST_HEADERS


@pytest.mark.parametrize("name, value", DROPPED)
def test_each_dangerous_header_is_not_passed(name, value):
    out = _up([(name, value), ("Accept", "*/*")], token=None)
    assert out.get(name.lower()) != value
    assert value not in out.values()
    assert out["accept"] == "*/*"


def test_gateway_sets_its_own_values_over_the_clients():
    out = _up([("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-Proto", "http"),
               ("X-Request-ID", "mine"), ("X-Identity-Token", "forged")])
    assert out["x-forwarded-for"] == "10.0.0.7"
    assert out["x-forwarded-proto"] == "https"
    assert out[REQUEST_ID_HEADER.lower()] == "rid-1"
    assert out[IDENTITY_TOKEN_HEADER.lower()] == "tok.en.jwt"


def test_no_token_means_no_token_header_even_if_client_sent_one():
    out = _up([("X-Identity-Token", "forged")], token=None)
    assert "x-identity-token" not in out and "forged" not in out.values()


def test_first_occurrence_wins_and_names_are_lower_cased():
    out = _up([("content-type", "text/plain"), ("Content-Type", "application/json"),
               ("ACCEPT", "a"), ("accept", "b")])
    assert out["content-type"] == "text/plain"
    assert out["accept"] == "a"
    assert all(k == k.lower() for k in out)


def test_works_with_a_multidict_items_view():
    incoming = CIMultiDict([("Accept", "x"), ("Accept", "y"), ("Cookie", "c")])
    out = _up(incoming.items(), token=None)
    assert out["accept"] == "x" and "cookie" not in out


def test_response_drops_hop_by_hop_and_server_set():
    upstream = [
        ("Content-Type", "application/pdf"), ("Connection", "close"), ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"), ("Trailer", "X-Sum"), ("TE", "trailers"),
        ("Proxy-Authenticate", "Basic"), ("Proxy-Connection", "close"), ("Server", "upstream/1"),
        ("Date", "Wed, 21 Oct 2015 07:28:00 GMT"), ("Content-Length", "10"), ("X-Request-ID", "up"),
        ("ETag", '"1"'), ("Content-Disposition", "attachment; filename=a.pdf"),
    ]
    assert client_response_headers(upstream) == [
        ("Content-Type", "application/pdf"), ("ETag", '"1"'), ("Content-Disposition", "attachment; filename=a.pdf")]


def test_response_drops_headers_named_in_connection():
    upstream = [("X-Secret", "s"), ("connection", "X-Secret , x-other,,"), ("X-Other", "o"),
                ("Connection", "x-third"), ("X-Third", "t"), ("X-Kept", "k"), ("Set-Cookie", "a=b")]
    assert client_response_headers(upstream) == [("X-Kept", "k"), ("Set-Cookie", "a=b")]


def test_response_keeps_repeated_headers_in_order():
    upstream = [("Link", "<a>"), ("Vary", "Accept"), ("Link", "<b>")]
    assert client_response_headers(upstream) == upstream


@pytest.mark.parametrize("headers, expected", [
    ({}, False),
    ({"Content-Length": "0"}, False),
    ({"Content-Length": " 0 "}, False),
    ({"Content-Length": "1"}, True),
    ({"Transfer-Encoding": "chunked"}, True),
    ({"Transfer-Encoding": "identity", "Content-Length": "0"}, True),
    ({"Content-Type": "application/json"}, False),
])
def test_has_body(headers, expected):
    assert has_body(CIMultiDict(headers)) is expected


def test_has_body_is_case_insensitive_on_aiohttp_headers():
    assert has_body(CIMultiDict({"transfer-encoding": "chunked"})) is True
    assert has_body(CIMultiDict({"content-length": "12"})) is True
