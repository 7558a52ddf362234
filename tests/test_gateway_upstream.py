"""Forwarding: the identity token, an upstream that is down or slow, slow clients, streaming."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import time

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from conftest import free_port
from gateway_harness import ORDER_CRM, ORDER_SLOW, client_context, gateway_running, session, write_config


async def get(test_pki, client, url):
    async with session(test_pki, test_pki.client(client)) as s:
        async with s.get(url) as resp:
            return resp.status, await resp.read(), resp


async def test_identity_token_names_client_and_certificate(tmp_path, test_pki, recorder, recorder_url):
    key = tmp_path / "token.key"
    config = write_config(tmp_path, test_pki, recorder_url,
                          identity_token={"key": str(key), "audience": "automation-api", "ttl_s": 60})
    async with gateway_running(config) as (url, _):
        status, _, _ = await get(test_pki, "crm", f"{url}/orders/{ORDER_CRM}/state")
    assert status == 200
    public = serialization.load_pem_private_key(key.read_bytes(), None).public_key()
    cert_der = x509.load_pem_x509_certificate(test_pki.client("crm")[0].read_bytes()).public_bytes(
        serialization.Encoding.DER)
    fingerprint = ":".join(f"{b:02X}" for b in hashlib.sha256(cert_der).digest())
    assert len(recorder.seen) == 2  # the order look-up and the call itself both carry the token
    for seen in recorder.seen:
        token = dict((k.lower(), v) for k, v in seen.headers)["x-identity-token"]
        claims = jwt.decode(token, public, algorithms=["ES256"], audience="automation-api")
        assert claims["sub"] == "crm" and claims["fingerprint_sha256"] == fingerprint
        assert claims["exp"] - claims["iat"] == 60


async def test_upstream_down_is_502(tmp_path, test_pki):
    config = write_config(tmp_path, test_pki, f"http://127.0.0.1:{free_port()}")
    async with gateway_running(config) as (url, _):
        status, body, resp = await get(test_pki, "crm", f"{url}/orders/{ORDER_CRM}/state")
    assert status == 502 and resp.content_type == "application/problem+json"
    assert b"Traceback" not in body and b"cannot be reached" in body


async def test_upstream_slower_than_timeout_is_504(gw, test_pki, recorder):
    started = time.monotonic()
    status, body, resp = await get(test_pki, "crm", f"{gw}/orders/{ORDER_SLOW}/state")
    assert status == 504 and resp.content_type == "application/problem+json"
    assert time.monotonic() - started < 4.5  # upstream.timeout_s is 2; the upstream would take 5


async def test_large_download_is_streamed(tmp_path, test_pki, recorder, recorder_url):
    recorder.document_bytes = 8 * 1024 * 1024
    async with gateway_running(write_config(tmp_path, test_pki, recorder_url)) as (url, _):
        async with session(test_pki, test_pki.client("crm")) as s:
            async with s.get(f"{url}/orders/{ORDER_CRM}/document") as resp:
                assert resp.status == 200
                assert resp.content_length == recorder.document_bytes
                total = 0
                async for chunk in resp.content.iter_chunked(1 << 16):
                    total += len(chunk)
    assert total == recorder.document_bytes


def _tls_socket(test_pki, port: int) -> ssl.SSLSocket:
    ctx = client_context(test_pki, test_pki.client("crm"))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost")


async def test_slow_client_headers_are_cut_off(gw, test_pki, recorder):
    port = int(gw.rsplit(":", 1)[1])

    def slowloris() -> float:
        started = time.monotonic()
        with _tls_socket(test_pki, port) as sock:
            sock.sendall(b"GET /orders/" + ORDER_CRM.encode() + b"/state HTTP/1.1\r\nHost: x\r\n")
            try:
                while time.monotonic() - started < 8:
                    sock.sendall(b"X-Slow: 1\r\n")  # never finishes the headers
                    sock.settimeout(0.5)
                    try:
                        if sock.recv(1) == b"":
                            break
                    except socket.timeout:
                        continue
            except (ConnectionError, ssl.SSLError, OSError):
                pass
        return time.monotonic() - started

    elapsed = await asyncio.get_running_loop().run_in_executor(None, slowloris)
    assert elapsed < 5, f"the connection stayed open {elapsed:.1f}s; header_timeout_s is 2"
    assert recorder.seen == []


async def test_silent_connection_without_handshake_is_closed(gw):
    port = int(gw.rsplit(":", 1)[1])

    def silent() -> float:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=8) as sock:
            try:
                sock.recv(1)
            except (socket.timeout, ConnectionError):
                pass
        return time.monotonic() - started

    assert await asyncio.get_running_loop().run_in_executor(None, silent) < 5


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Split: a\rInjected: yes\r\nContent-Length: 2\r\n\r\nok",
    b"not http at all\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort",
])
async def test_malformed_upstream_answers_are_502(tmp_path, test_pki, answer):
    """Response framing is read by aiohttp's parser; anything it refuses never reaches the client."""

    async def lookup_then_bad(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /orders/") and b"/state" not in head.split(b"\r\n")[0]:
            body = json.dumps({"solicitor": {"source": "EXTERNAL", "identifier": "198603052385"}}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(body), body))
        else:
            writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(lookup_then_bad, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        config = write_config(tmp_path, test_pki, f"http://127.0.0.1:{port}")
        async with gateway_running(config) as (url, _):
            status, body, resp = await get(test_pki, "crm", f"{url}/orders/{ORDER_CRM}/state")
    finally:
        server.close()
    assert status == 502 and resp.content_type == "application/problem+json"
    assert b"Injected" not in body and "Injected" not in resp.headers


async def test_slow_request_body_is_408(tmp_path, test_pki, recorder_url, recorder):
    config = write_config(tmp_path, test_pki, recorder_url,
                          limits={"max_body_bytes": 1_000_000, "header_timeout_s": 2, "request_timeout_s": 1})
    async with gateway_running(config) as (url, _):
        port = int(url.rsplit(":", 1)[1])

        def stall() -> tuple[bytes, float]:
            started = time.monotonic()
            with _tls_socket(test_pki, port) as sock:
                sock.sendall(b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                             b"Content-Length: 1000\r\n\r\n--b\r\n")  # and then nothing more
                sock.settimeout(8)
                answer = sock.recv(4096)
            return answer, time.monotonic() - started

        answer, elapsed = await asyncio.get_running_loop().run_in_executor(None, stall)
    assert answer.startswith(b"HTTP/1.1 408") and b"application/problem+json" in answer
    assert elapsed < 5 and recorder.seen == []


@pytest.mark.parametrize("raw", [
    b"GET /x\xffy HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /orders HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"POST /orders HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
])
async def test_requests_aiohttp_cannot_parse_are_problem_json_and_audited(tmp_path, test_pki, recorder_url,
                                                                         recorder, raw):
    config = write_config(tmp_path, test_pki, recorder_url)
    async with gateway_running(config) as (url, _):
        port = int(url.rsplit(":", 1)[1])

        def send() -> bytes:
            with _tls_socket(test_pki, port) as sock:
                sock.sendall(raw)
                sock.settimeout(5)
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
                return data

        answer = await asyncio.get_running_loop().run_in_executor(None, send)
    assert answer.split(b" ")[1] == b"400" and b"application/problem+json" in answer
    assert b"X-Request-ID" in answer
    records = [json.loads(line) for line in (tmp_path / "data" / "audit.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["status"] == 400 and records[0]["client"] == "crm"
    assert records[0]["reason"].startswith("malformed HTTP request") and records[0]["decision"] == "deny"
    assert recorder.seen == []


async def test_interim_upstream_answers_are_skipped(tmp_path, test_pki):
    async def early_hints(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        if b"/state" in head.split(b"\r\n")[0]:
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n"
                         b"Connection: close\r\n\r\nPENDING")
        else:
            body = json.dumps({"solicitor": {"source": "EXTERNAL", "identifier": "198603052385"}}).encode()
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(early_hints, "127.0.0.1", 0)
    try:
        config = write_config(tmp_path, test_pki, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        async with gateway_running(config) as (url, _):
            status, body, _ = await get(test_pki, "crm", f"{url}/orders/{ORDER_CRM}/state")
    finally:
        server.close()
    assert (status, body) == (200, b"PENDING")


async def test_non_ascii_header_values_pass_as_sent(gw, test_pki, recorder):
    status, _, _ = await get_with(test_pki, "crm", f"{gw}/orders/{ORDER_CRM}/state", {"User-Agent": "Åsa/1.0 日本"})
    assert status == 200
    (seen,) = [r for r in recorder.seen if r.path.endswith("/state")]
    assert dict((k.lower(), v) for k, v in seen.headers)["user-agent"] == "Åsa/1.0 日本"


async def get_with(test_pki, client, url, headers):
    async with session(test_pki, test_pki.client(client)) as s:
        async with s.get(url, headers=headers) as resp:
            return resp.status, await resp.read(), resp


async def test_embedded_upstream_readiness_is_its_own_readyz(aiohttp_server):
    """The embedded reference API's /readyz (its user directory) is the upstream's readiness; another
    upstream is ready when it answers at all."""
    from aiohttp import web

    from gateway.shell.upstream import Upstream

    state = {"ready": False}

    async def readyz(request):
        body = {"ready": state["ready"], "problems": {} if state["ready"] else {"directory": "ldap down"}}
        return web.json_response(body, status=200 if state["ready"] else 503)

    app = web.Application()
    app.router.add_get("/readyz", readyz)
    server = await aiohttp_server(app)
    url = f"http://127.0.0.1:{server.port}"
    embedded, other = Upstream(url, 2, ready_path="/readyz"), Upstream(url, 2)
    try:
        problem = await embedded.ready()
        assert problem is not None and "503" in problem and "ldap down" in problem
        assert await other.ready() is None   # GET / is a 404: it answers, so it is ready
        state["ready"] = True
        assert await embedded.ready() is None
    finally:
        await embedded.close()
        await other.close()
