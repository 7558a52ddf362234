"""The TLS handshake: only valid, trusted, unrevoked client certificates for clientAuth get in."""

from __future__ import annotations

import pytest

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


@pytest.mark.parametrize("name, reason", [
    ("stranger", "matches no client policy"),
    ("twin", "more than one client policy (twin-a, twin-b)"),
])
async def test_unmapped_or_twice_mapped_certificate_is_403(gw, test_pki, recorder, name, reason):
    async with session(test_pki, test_pki.client(name)) as s:
        async with s.get(gw + STATE) as resp:
            body = await resp.json(content_type=None)
            assert resp.status == 403 and resp.content_type == "application/problem+json"
    assert reason in body["detail"] and body["request_id"] == resp.headers["X-Request-ID"]
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
