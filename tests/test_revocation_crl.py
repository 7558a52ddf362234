"""CRLs fetched from where the PKI publishes them (tls.revocation.crl_fetch), with a real HTTP server.

The CRL server is an aiohttp app on a loopback port publishing DER CRLs that each
test changes; the gateway runs in this process. A revocation published there
reaches a connection already open within refresh_s plus a fetch; a CRL that is
not the CA's, goes backwards or is stale is not taken; the last good one
survives a restart with the server gone.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from conftest import free_port
from gateway.core.revocation import FetchedCRL, accept_crl, crl_warn_at
from gateway.tools import pki
from gateway_harness import ORDER_CRM, POLICIES, gateway_running, session, write_config
from test_gateway_metrics import scrape, value

NOW = dt.datetime.now(dt.timezone.utc)
DAY = dt.timedelta(days=1)
STATE = f"/orders/{ORDER_CRM}/state"


@dataclass
class CRLServer:
    """Publishes `body` at /ca.crl; `up` False answers 503, as a distribution point that is down."""

    body: bytes = b""
    up: bool = True
    hits: list[float] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append(time.monotonic())
        if not self.up:
            return web.Response(status=503)
        return web.Response(body=self.body, content_type="application/pkix-crl")


@pytest.fixture
async def crl_server():
    server = CRLServer()
    app = web.Application()
    app.router.add_get("/ca.crl", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    server.url = f"http://127.0.0.1:{port}/ca.crl"
    yield server
    await runner.cleanup()


def crl_der(ca, number: int, revoked: list[int] = (), last_update=None, next_update=None) -> bytes:
    entries = [x509.RevokedCertificateBuilder().serial_number(s).revocation_date(NOW - DAY).build() for s in revoked]
    crl = pki.make_crl(*ca, number=number, last_update=last_update or NOW - DAY,
                       next_update=next_update or NOW + 7 * DAY, revoked=entries)
    return crl.public_bytes(Encoding.DER)


def serial_of(path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def config_for(tmp_path, test_pki, recorder_url, server: CRLServer, **revocation):
    tls = {"cert": str(test_pki.dir / "server.crt"), "key": str(test_pki.dir / "server.key"),
           "client_ca": str(test_pki.ca), "crl": None,
           "revocation": {"crl_fetch": True, "crl_urls": [server.url], "refresh_s": 1,
                          "cache_dir": str(tmp_path / "revocation"), **revocation}}
    return write_config(tmp_path, test_pki, recorder_url, {"crm": POLICIES["crm"]}, tls=tls)


async def status_until(s, url: str, want: int, deadline_s: float = 8.0) -> tuple[int, dict]:
    """Ask on the same keep-alive session until the answer is `want` (polled with a deadline)."""
    deadline = time.monotonic() + deadline_s
    while True:
        async with s.get(url) as resp:
            body = await resp.read()
            status = resp.status
        if status == want or time.monotonic() > deadline:
            return status, (json.loads(body) if body.startswith(b"{") else {})
        await asyncio.sleep(0.1)


# -- the pure rules --------------------------------------------------------------------------------


def test_a_fetched_crl_is_taken_only_from_its_ca_current_and_not_going_backwards(test_pki):
    root = pki.load_ca(test_pki.dir)
    other = pki.make_ca("Other CA", not_before=NOW - DAY, not_after=NOW + 30 * DAY)
    now = time.time()
    good, why = accept_crl(crl_der(root, 5, [7]), [root[0]], lambda key: None, now)
    assert isinstance(good, FetchedCRL) and good.revoked == {7} and good.number == 5, why
    pem = x509.load_der_x509_crl(crl_der(root, 5)).public_bytes(Encoding.PEM)
    assert accept_crl(pem, [root[0]], lambda key: None, now)[0] is not None
    impostor = pki.make_crl(root[0], other[1], number=9, last_update=NOW - DAY,
                            next_update=NOW + DAY).public_bytes(Encoding.DER)   # the root's name, another key
    cases = {
        "its signature does not verify": impostor,
        "which is no CA of tls.client_ca": crl_der(other, 1),
        "stale": crl_der(root, 6, last_update=NOW - 10 * DAY, next_update=NOW - DAY),
        "lower than the 5 in force": crl_der(root, 4),
        "not a CRL": b"<html>not found</html>",
    }
    for words, data in cases.items():
        taken, why = accept_crl(data, [root[0], other[0]] if "no CA" not in words else [root[0]],
                                {(good.issuer, good.issuer_key): good}.get, now)
        assert taken is None and words in why, (words, why)


def test_a_delta_or_partitioned_crl_is_not_taken_for_a_complete_one(test_pki):
    root = pki.load_ca(test_pki.dir)

    def crl_with(extension) -> bytes:
        b = (x509.CertificateRevocationListBuilder().issuer_name(root[0].subject).last_update(NOW - DAY)
             .next_update(NOW + DAY).add_extension(x509.CRLNumber(3), critical=False)
             .add_extension(extension, critical=True))
        from cryptography.hazmat.primitives import hashes
        return b.sign(root[1], hashes.SHA256()).public_bytes(Encoding.DER)

    delta = crl_with(x509.DeltaCRLIndicator(2))
    users_only = crl_with(x509.IssuingDistributionPoint(
        full_name=None, relative_name=None, only_contains_user_certs=True, only_contains_ca_certs=False,
        only_some_reasons=None, indirect_crl=False, only_contains_attribute_certs=False))
    for data, words in ((delta, "a delta CRL"), (users_only, "partitioned")):
        taken, why = accept_crl(data, [root[0]], lambda key: None, time.time())
        assert taken is None and words in why, why


def test_what_a_crl_or_an_answer_revoked_stays_revoked_and_chains_are_kept_apart_by_ca(test_pki):
    from gateway.core.revocation import CachedAnswer, answer_key, chain_status, crl_key

    root = pki.load_ca(test_pki.dir)
    twin = pki.make_ca("gateway example CA", not_before=NOW - DAY, not_after=NOW + 30 * DAY)  # same name
    leaf = x509.load_pem_x509_certificate(test_pki.client("crm")[0].read_bytes())
    now = time.time()
    stale = FetchedCRL(root[0].subject.rfc4514_string(), "k", 1, now - 10 * 86400, now - 86400,
                       frozenset({leaf.serial_number}), b"")
    crls = {crl_key(leaf, root[0]): stale}
    status = chain_status((leaf, root[0]), now, ocsp="off", max_age_s=300, answers={}, crl_fetch=True,
                          crl_check="leaf", crls=crls)
    assert status.result == "revoked"                       # the CRL went stale: the revocation did not
    # the same serial under another CA of the same name is not covered by this CA's CRL
    other = chain_status((leaf, twin[0]), now, ocsp="off", max_age_s=300, answers={}, crl_fetch=True,
                         crl_check="leaf", crls=crls)
    assert other.result == "unavailable"
    old_revoked = {answer_key(leaf, root[0]): CachedAnswer("revoked", now - 86400, now - 3600)}
    assert chain_status((leaf, root[0]), now, ocsp="leaf", max_age_s=300, answers=old_revoked, crl_fetch=False,
                        crl_check="leaf", crls={}).result == "revoked"
    # a resumed session shows the leaf alone: nothing to look up by, so never "good"
    good = {answer_key(leaf, root[0]): CachedAnswer("good", now, now + 3600)}
    assert chain_status((leaf,), now, ocsp="leaf", max_age_s=300, answers=good, crl_fetch=False,
                        crl_check="leaf", crls={}).result == "unavailable"


def test_crl_warnings_are_relative_to_the_crl_period():
    week, year = 7 * 86400, 365 * 86400
    assert crl_warn_at(0, week) == week - week / 4          # weekly: warn with 1.75 days left
    assert crl_warn_at(0, year) == year - 14 * 86400         # yearly: 14 days
    assert crl_warn_at(0, 40 * 86400) == 30 * 86400          # 40 days: a quarter is 10 days


# -- through the gateway ---------------------------------------------------------------------------


async def test_a_revocation_published_at_the_distribution_point_reaches_an_open_connection(
        tmp_path, test_pki, recorder_url, recorder, crl_server):
    root = pki.load_ca(test_pki.dir)
    crm = serial_of(test_pki.client("crm")[0])
    crl_server.body = crl_der(root, 1)
    config = config_for(tmp_path, test_pki, recorder_url, crl_server)
    async with gateway_running(config) as (url, running):
        async with session(test_pki, test_pki.client("crm")) as s:
            assert (await status_until(s, url + STATE, 200))[0] == 200
            crl_server.body = crl_der(root, 2, [crm])
            status, body = await status_until(s, url + STATE, 403)
            assert status == 403 and "revoked" in body["detail"], body
            forwarded = len(recorder.forwarded())   # the 200s until the next fetch
        families = await scrape(running.config.admin)
        assert value(families, "gateway_revocation_checks_total", method="crl_fetch", result="good") >= 2
        assert value(families, "gateway_revocation_checks_total", method="ocsp", result="good") == 0   # initialised
        due = value(families, "gateway_certificate_expiry_timestamp_seconds",
                    certificate=f"crl_fetch:{root[0].subject.rfc4514_string()}")
        assert abs(due - (NOW + 7 * DAY).timestamp()) < 2
        # a CRL going backwards, one not signed by the CA, and a stale one are not taken: still revoked
        before = value(families, "gateway_revocation_checks_total", method="crl_fetch", result="error")
        other = pki.make_ca("gateway example CA", not_before=NOW - DAY, not_after=NOW + DAY)   # same name, other key
        for bad in (crl_der(root, 1), crl_der(other, 3), crl_der(root, 3, last_update=NOW - 9 * DAY,
                                                                  next_update=NOW - DAY)):
            crl_server.body = bad
            hits = len(crl_server.hits)
            while len(crl_server.hits) < hits + 2:
                await asyncio.sleep(0.05)
            async with session(test_pki, test_pki.client("crm")) as s:
                assert (await status_until(s, url + STATE, 403, deadline_s=0))[0] == 403
        families = await scrape(running.config.admin)
        assert value(families, "gateway_revocation_checks_total", method="crl_fetch", result="error") >= before + 3
    assert len(recorder.forwarded()) == forwarded   # nothing reached the upstream once it was revoked


async def test_the_last_good_crl_survives_a_restart_with_the_server_gone(tmp_path, test_pki, recorder_url,
                                                                         crl_server):
    root = pki.load_ca(test_pki.dir)
    crl_server.body = crl_der(root, 1, [serial_of(test_pki.client("crm")[0])])
    config = config_for(tmp_path, test_pki, recorder_url, crl_server)
    async with gateway_running(config) as (url, _):
        async with session(test_pki, test_pki.client("crm")) as s:
            assert (await status_until(s, url + STATE, 403))[0] == 403
    crl_server.up = False
    async with gateway_running(config) as (url, _):
        async with session(test_pki, test_pki.client("crm")) as s:
            status, body = await status_until(s, url + STATE, 403, deadline_s=0)
    assert status == 403 and "revoked" in body["detail"], body
    assert list((tmp_path / "revocation").glob("crl-*.der"))


@pytest.mark.parametrize("on_unavailable, status", [("deny", 403), ("allow", 200)])
async def test_no_crl_to_be_had_follows_on_unavailable(tmp_path, test_pki, recorder_url, recorder, crl_server,
                                                       on_unavailable, status):
    crl_server.up = False
    config = config_for(tmp_path, test_pki, recorder_url, crl_server, on_unavailable=on_unavailable)
    async with gateway_running(config) as (url, running):
        async with session(test_pki, test_pki.client("crm")) as s:
            got, body = await status_until(s, url + STATE, status, deadline_s=0)
        families = await scrape(running.config.admin)
    assert got == status, body
    assert value(families, "gateway_revocation_checks_total", method="crl_fetch", result="unavailable") >= 1
    (line,) = [json.loads(x) for x in (tmp_path / "data" / "audit.jsonl").read_bytes().splitlines()]
    if status == 403:
        assert line["code"] == "revocation_unavailable" and "revocation" not in line
    else:
        assert line["revocation"].startswith("unavailable, let through") and "no current CRL" in line["revocation"]


async def test_the_distribution_point_of_a_client_certificate_is_fetched_on_its_first_request(
        tmp_path, test_pki, recorder_url, recorder, crl_server):
    """No crl_urls: the CRL is found where the certificate says, and the first request waits for it."""
    root = pki.load_ca(test_pki.dir)
    cert, key = pki.make_client_cert(*root, "crm", not_before=NOW - DAY, not_after=NOW + 20 * DAY,
                                     crl_url=crl_server.url)
    pki.write_pem(tmp_path / "crm.crt", cert)
    pki.write_pem(tmp_path / "crm.key", key)
    crl_server.body = crl_der(root, 1, [cert.serial_number])
    config = config_for(tmp_path, test_pki, recorder_url, crl_server, crl_urls=[])
    async with gateway_running(config) as (url, running):
        assert crl_server.hits == []      # nothing named it before
        async with session(test_pki, (tmp_path / "crm.crt", tmp_path / "crm.key")) as s:
            status, body = await status_until(s, url + STATE, 403, deadline_s=0)
        families = await scrape(running.config.admin)
    assert status == 403 and "revoked" in body["detail"], body
    assert len(crl_server.hits) >= 1 and recorder.seen == []
    # the client's certificate lifetime is in sight from its first request
    assert value(families, "gateway_client_certificate_expiry_timestamp_seconds", client="crm") == \
        pytest.approx(cert.not_valid_after_utc.timestamp())


async def test_a_crl_past_its_next_update_is_fetched_again_at_once(tmp_path, test_pki, recorder_url, crl_server):
    """refresh_s is long; the CRL in force runs out in 2 s: the next one is fetched then, not 300 s later."""
    root = pki.load_ca(test_pki.dir)
    crl_server.body = crl_der(root, 1, next_update=dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=2))
    config = config_for(tmp_path, test_pki, recorder_url, crl_server, refresh_s=300)
    async with gateway_running(config) as (url, _):
        async with session(test_pki, test_pki.client("crm")) as s:
            assert (await status_until(s, url + STATE, 200, deadline_s=0))[0] == 200
            crl_server.body = crl_der(root, 2, [serial_of(test_pki.client("crm")[0])])
            started = time.monotonic()
            status, body = await status_until(s, url + STATE, 403, deadline_s=8)
    assert status == 403 and "revoked" in body["detail"], body
    assert time.monotonic() - started < 8 and 2 <= len(crl_server.hits) <= 3
