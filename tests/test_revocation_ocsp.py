"""OCSP through the gateway (tls.revocation.ocsp), with OpenSSL's own responder (`openssl ocsp`).

The client certificates carry an AIA pointing at the responder; the gateway runs in
this process. A certificate revoked at the responder is refused on a connection
already open once its answer is older than ocsp_max_age_s; answers the gateway must
not take (a signer without the OCSP-signing purpose, a responder that is down or
hangs) are never "good"; one fetch serves every request waiting for it.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from aiohttp import web

from conftest import free_port
from gateway.tools import pki
from gateway_harness import ORDER_CRM, POLICIES, gateway_running, session, write_config
from ocsp_responder import OcspResponder
from test_gateway_metrics import scrape, value

STATE = f"/orders/{ORDER_CRM}/state"


@pytest.fixture
def responder(tmp_path, test_pki):
    root = pki.load_ca(test_pki.dir)
    with OcspResponder(tmp_path / "ocsp", *root) as running:
        yield running


def client_files(tmp_path, responder: OcspResponder, name: str = "crm", **kw):
    cert, key = responder.issue(name, **kw)
    pki.write_pem(tmp_path / f"{name}-ocsp.crt", cert)
    pki.write_pem(tmp_path / f"{name}-ocsp.key", key)
    return cert, (tmp_path / f"{name}-ocsp.crt", tmp_path / f"{name}-ocsp.key")


def config_for(tmp_path, test_pki, recorder_url, **revocation):
    tls = {"cert": str(test_pki.dir / "server.crt"), "key": str(test_pki.dir / "server.key"),
           "client_ca": str(test_pki.ca), "crl": str(test_pki.dir / "crl.pem"),
           "revocation": {"ocsp": "leaf", "cache_dir": str(tmp_path / "revocation"), **revocation}}
    return write_config(tmp_path, test_pki, recorder_url, {"crm": POLICIES["crm"]}, tls=tls)


async def get(s, url: str) -> tuple[int, dict]:
    async with s.get(url) as resp:
        body = await resp.read()
        return resp.status, (json.loads(body) if body.startswith(b"{") else {})


async def until(s, url: str, want: int, deadline_s: float = 8.0) -> tuple[int, dict]:
    deadline = time.monotonic() + deadline_s
    while True:
        status, body = await get(s, url)
        if status == want or time.monotonic() > deadline:
            return status, body
        await asyncio.sleep(0.1)


async def post_server(handler) -> tuple[web.AppRunner, int]:
    """A stand-in responder answering POST / on a loopback port: (its runner, to clean up; its port)."""
    app = web.Application()
    app.router.add_post("/", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def audit_lines(tmp_path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "data" / "audit.jsonl").read_bytes().splitlines()]


async def test_a_certificate_revoked_at_the_responder_is_refused_on_an_open_connection(
        tmp_path, test_pki, recorder_url, recorder, responder):
    cert, files = client_files(tmp_path, responder)
    config = config_for(tmp_path, test_pki, recorder_url, ocsp_max_age_s=1)
    async with gateway_running(config) as (url, running):
        async with session(test_pki, files) as s:
            assert (await get(s, url + STATE))[0] == 200
            responder.revoke(cert.serial_number)
            status, body = await until(s, url + STATE, 403)
            assert status == 403 and "revoked" in body["detail"], body
            forwarded = len(recorder.forwarded())
        families = await scrape(running.config.admin)
    assert value(families, "gateway_revocation_checks_total", method="ocsp", result="good") >= 1
    assert value(families, "gateway_revocation_checks_total", method="ocsp", result="revoked") >= 1
    assert value(families, "gateway_denied_total", client="crm", reason="revoked") >= 1
    assert len(recorder.forwarded()) == forwarded
    assert audit_lines(tmp_path)[-1]["code"] == "revoked"


async def test_an_answer_signed_without_the_ocsp_signing_purpose_is_never_good(tmp_path, test_pki, recorder_url,
                                                                             recorder):
    root = pki.load_ca(test_pki.dir)
    now = pki._now()
    import datetime as dt

    signer = pki.make_ocsp_responder(root, now - dt.timedelta(days=1), now + dt.timedelta(days=30), eku_ocsp=False)
    with OcspResponder(tmp_path / "ocsp", *root, signer=signer) as bad:
        _, files = client_files(tmp_path, bad)
        config = config_for(tmp_path, test_pki, recorder_url)
        async with gateway_running(config) as (url, running):
            async with session(test_pki, files) as s:
                status, body = await get(s, url + STATE)
            families = await scrape(running.config.admin)
    assert status == 403 and body["detail"].startswith("the client certificate's revocation status cannot be learnt")
    assert value(families, "gateway_revocation_checks_total", method="ocsp", result="error") == 1
    assert value(families, "gateway_revocation_checks_total", method="ocsp", result="good") == 0
    assert recorder.seen == []


@pytest.mark.parametrize("on_unavailable, status", [("deny", 403), ("allow", 200)])
async def test_a_responder_that_is_down_follows_on_unavailable(tmp_path, test_pki, recorder_url, recorder,
                                                               responder, on_unavailable, status):
    _, files = client_files(tmp_path, responder)
    responder.stop()
    config = config_for(tmp_path, test_pki, recorder_url, on_unavailable=on_unavailable)
    async with gateway_running(config) as (url, running):
        async with session(test_pki, files) as s:
            got, body = await get(s, url + STATE)
        families = await scrape(running.config.admin)
    assert got == status, body
    assert value(families, "gateway_revocation_checks_total", method="ocsp", result="unavailable") == 1
    (line,) = audit_lines(tmp_path)
    if status == 200:
        assert line["revocation"].startswith("unavailable, let through") and "OCSP" in line["revocation"]
    else:
        assert line["code"] == "revocation_unavailable"


async def test_a_responder_that_hangs_costs_one_timeout_not_a_stall(tmp_path, test_pki, recorder_url, responder):
    """A responder that accepts and never answers: the request waits for the fetch's timeout, once."""
    _, files = client_files(tmp_path, responder)
    hung = []

    async def never(reader, writer):
        hung.append(writer)
        await reader.read()

    server = await asyncio.start_server(never, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = config_for(tmp_path, test_pki, recorder_url, ocsp_url=f"http://127.0.0.1:{port}/")
    try:
        async with gateway_running(config) as (url, _):
            async with session(test_pki, files) as s:
                started = time.monotonic()
                first = await get(s, url + STATE)
                waited = time.monotonic() - started
                started = time.monotonic()
                second = await get(s, url + STATE)     # the failure is remembered: no second wait
                again = time.monotonic() - started
    finally:
        server.close()
    assert first[0] == second[0] == 403, (first, second)
    assert 4 < waited < 8 and again < 1, (waited, again)
    assert len(hung) == 1


async def test_one_fetch_serves_every_request_waiting_for_it(tmp_path, test_pki, recorder_url, responder):
    """Twenty new connections at once, no answer known: one request goes to the responder (ocsp_url)."""
    _, files = client_files(tmp_path, responder)
    posts = []

    async def relay(request: web.Request) -> web.Response:
        posts.append(time.monotonic())
        await asyncio.sleep(0.3)   # slow enough for every connection to be waiting
        async with aiohttp.ClientSession() as s, s.post(responder.url, data=await request.read(),
                                                        headers={"Content-Type": "application/ocsp-request"}) as r:
            return web.Response(body=await r.read(), content_type="application/ocsp-response")

    runner, port = await post_server(relay)
    config = config_for(tmp_path, test_pki, recorder_url, ocsp_url=f"http://127.0.0.1:{port}/")
    try:
        async with gateway_running(config) as (url, _):
            async def one():
                async with session(test_pki, files) as s:
                    return (await get(s, url + STATE))[0]

            statuses = await asyncio.gather(*(one() for _ in range(20)))
    finally:
        await runner.cleanup()
    assert statuses == [200] * 20
    assert len(posts) == 1


async def test_a_good_answer_is_kept_across_a_restart_with_the_responder_down(tmp_path, test_pki, recorder_url,
                                                                               responder):
    _, files = client_files(tmp_path, responder)
    config = config_for(tmp_path, test_pki, recorder_url, ocsp_max_age_s=600)
    async with gateway_running(config) as (url, _):
        async with session(test_pki, files) as s:
            assert (await get(s, url + STATE))[0] == 200
    responder.stop()
    async with gateway_running(config) as (url, running):
        async with session(test_pki, files) as s:
            status, body = await get(s, url + STATE)
        families = await scrape(running.config.admin)
    assert status == 200, body
    assert value(families, "gateway_revocation_checks_total", method="ocsp", result="unavailable") == 0
    assert list((tmp_path / "revocation").glob("ocsp-*.der"))


async def test_an_old_good_answer_without_next_update_is_not_taken_as_fresh(tmp_path, test_pki, recorder_url,
                                                                            recorder, responder):
    """An answer that states no nextUpdate is as old as its thisUpdate: a day-old "good", replayed by
    someone on the way to a plain-HTTP responder, is refused, however fresh its delivery."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509 import ocsp

    root = pki.load_ca(test_pki.dir)
    cert, files = client_files(tmp_path, responder)
    then = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)
    old = (ocsp.OCSPResponseBuilder()
           .add_response(cert=cert, issuer=root[0], algorithm=hashes.SHA1(), cert_status=ocsp.OCSPCertStatus.GOOD,
                         this_update=then, next_update=None, revocation_time=None, revocation_reason=None)
           .responder_id(ocsp.OCSPResponderEncoding.HASH, root[0])
           .sign(root[1], hashes.SHA256()).public_bytes(serialization.Encoding.DER))

    async def replay(request: web.Request) -> web.Response:
        return web.Response(body=old, content_type="application/ocsp-response")

    runner, port = await post_server(replay)
    config = config_for(tmp_path, test_pki, recorder_url, ocsp_url=f"http://127.0.0.1:{port}/")
    try:
        async with gateway_running(config) as (url, running):
            async with session(test_pki, files) as s:
                status, body = await get(s, url + STATE)
            families = await scrape(running.config.admin)
    finally:
        await runner.cleanup()
    assert status == 403, body
    assert value(families, "gateway_revocation_checks_total", method="ocsp", result="error") == 1
    assert recorder.seen == []
