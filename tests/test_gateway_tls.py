"""The TLS handshake: only valid, trusted, unrevoked client certificates for clientAuth get in."""

from __future__ import annotations

import pytest

from conftest import need_programs
from gateway.shell import oplog
from gateway_harness import ORDER_CRM, session

STATE = f"/orders/{ORDER_CRM}/state"


async def get_status(test_pki, cert, url) -> int:
    async with session(test_pki, cert) as s:
        async with s.get(url) as resp:
            await resp.read()
            return resp.status


async def test_a_good_certificate_gets_in(gw, test_pki, recorder):
    assert await get_status(test_pki, test_pki.client("crm"), gw + STATE) == 200
    assert recorder.forwarded() == [f"GET {STATE}"]


@pytest.mark.parametrize("which", ["expired", "not-yet-valid", "server-auth-only", "wrong-ca"])
async def test_bad_certificates_are_refused_in_the_handshake(gw, test_pki, recorder, which):
    import aiohttp

    with pytest.raises((aiohttp.ClientConnectionError, aiohttp.ClientSSLError, ConnectionError)):
        await get_status(test_pki, test_pki.special(which), gw + STATE)
    assert recorder.seen == []


async def test_revoked_certificate_is_refused(gw, test_pki, recorder):
    import aiohttp

    with pytest.raises((aiohttp.ClientConnectionError, aiohttp.ClientSSLError, ConnectionError)):
        await get_status(test_pki, test_pki.client("revoked-one"), gw + STATE)
    assert recorder.seen == []


async def test_no_client_certificate_is_refused(gw, test_pki, recorder):
    import aiohttp

    with pytest.raises((aiohttp.ClientConnectionError, aiohttp.ClientSSLError, ConnectionError)):
        await get_status(test_pki, None, gw + STATE)
    assert recorder.seen == []


async def test_unmapped_certificate_is_403(gw, test_pki, recorder):
    async with session(test_pki, test_pki.client("stranger")) as s:
        async with s.get(gw + STATE) as resp:
            body = await resp.json(content_type=None)
            assert resp.status == 403 and resp.content_type == "application/problem+json"
    assert "matches no client policy" in body["detail"] and body["request_id"] == resp.headers["X-Request-ID"]
    assert recorder.seen == []


async def test_tls_1_1_is_refused(gw, test_pki):
    import ssl

    import aiohttp

    from gateway_harness import client_context

    ctx = client_context(test_pki, test_pki.client("crm"))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    except ValueError:
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        with pytest.raises((aiohttp.ClientConnectionError, aiohttp.ClientSSLError, ConnectionError)):
            async with s.get(gw + STATE) as resp:
                await resp.read()


async def test_client_issued_by_an_intermediate_in_the_bundle(tmp_path, test_pki, recorder_url, recorder):
    from cryptography.hazmat.primitives import serialization

    from gateway.tools import pki
    from gateway_harness import DAY, NOW, POLICIES, gateway_running, write_config

    root = pki.load_ca(test_pki.dir)
    inter = pki.make_ca("gateway example issuing CA", not_before=NOW - DAY, not_after=NOW + 30 * DAY,
                        issuer=root, path_length=0)
    cert, key = pki.make_client_cert(*inter, "crm", not_before=NOW - DAY, not_after=NOW + 10 * DAY)
    pki.write_pem(tmp_path / "crm.crt", cert)
    pki.write_pem(tmp_path / "crm.key", key)
    pem = serialization.Encoding.PEM
    (tmp_path / "bundle.pem").write_bytes(root[0].public_bytes(pem) + inter[0].public_bytes(pem))
    crls = (test_pki.dir / "crl.pem").read_bytes() + pki.make_crl(
        *inter, number=1, last_update=NOW - DAY, next_update=NOW + 10 * DAY).public_bytes(pem)
    (tmp_path / "crls.pem").write_bytes(crls)
    tls = {"cert": str(test_pki.dir / "server.crt"), "key": str(test_pki.dir / "server.key"),
           "client_ca": str(tmp_path / "bundle.pem"), "crl": str(tmp_path / "crls.pem"), "crl_check": "chain"}
    config = write_config(tmp_path, test_pki, recorder_url, policies={"crm": POLICIES["crm"]}, tls=tls)
    async with gateway_running(config) as (url, _):
        assert await get_status(test_pki, (tmp_path / "crm.crt", tmp_path / "crm.key"), url + STATE) == 200
        # the root's own clients still get in; the chain check found both CRLs
        assert await get_status(test_pki, test_pki.client("crm"), url + STATE) == 200
    assert recorder.forwarded() == [f"GET {STATE}", f"GET {STATE}"]


@pytest.mark.parametrize("which, alert, reason", [
    ("wrong-ca", "alert unknown ca", "unknown_ca"),
    ("expired", "alert certificate expired", "expired"),
    ("server-auth-only", "alert unsupported certificate", "bad_purpose"),
    (None, "alert certificate required", "no_certificate"),
])
async def test_a_refused_handshake_says_why_as_nginx_does(gw, test_pki, capsys, which, alert, reason):
    """A real TLS alert to the client (not a bare reset) and a log line naming the certificate."""
    import asyncio
    import json
    need_programs("curl")
    cert = [] if which is None else ["--cert", str(test_pki.special(which)[0]), "--key", str(test_pki.special(which)[1])]
    proc = await asyncio.create_subprocess_exec("curl", "-sS", "--cacert", str(test_pki.ca), *cert, gw + STATE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert alert in err.decode(), err
    oplog.drain()
    logged = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"handshake_failure"' in line]
    assert [e["reason"] for e in logged] == [reason] and logged[0]["verify_message"]
    if which is not None:
        assert logged[0]["subject"] == "CN=hr-system,O=gateway example" and logged[0]["serial"]


async def test_a_client_that_hangs_up_mid_handshake_is_logged_by_what_happened(gw, test_pki, capsys):
    """asyncio reports such a handshake with the class ConnectionResetError, not an instance of it."""
    import asyncio
    import json
    import ssl
    import time
    from urllib.parse import urlsplit

    from gateway.shell.listener import failure_details, handshake_failure_reason

    assert failure_details(ConnectionResetError(), None) == {"verify_message": "ConnectionResetError"}
    assert handshake_failure_reason(ConnectionResetError()) == "protocol"
    hello = ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), hello, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    url = urlsplit(gw)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(hello.read())  # the ClientHello, then nothing
    await writer.drain()
    await reader.read(4096)      # the server's first flight: the handshake is under way
    writer.transport.abort()     # gone before the client's certificate
    deadline = time.monotonic() + 5
    while True:
        oplog.drain()
        logged = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"handshake_failure"' in line]
        if logged or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert [(e["reason"], e["verify_message"]) for e in logged] == [("protocol", "ConnectionResetError")]
