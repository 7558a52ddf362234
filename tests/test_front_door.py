"""The front door holds on every request: no side doors, no stale credentials, no leaks.

Raw requests over real mTLS sockets (tests/raw_tls.py): request targets and
headers no HTTP library sends, kept and resumed TLS sessions, connections kept
open while a certificate or a CRL runs out. The gateway runs in this process
with a clock the test moves, so that "an hour later" needs no waiting.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import ssl
import statistics
import time
from pathlib import Path

import aiohttp
import pytest

from conftest import Clock
from gateway.tools import certs, pki
from gateway.runtime import lifecycle as server
from gateway.reference.documents import sample_pdf
from gateway_harness import (
    DAY, NOW, ORDER_CRM, ORDER_HR, PKIFolder, build_pki, write_config,
)
from raw_tls import RawClient, RawResponse, get

STATE = f"/orders/{ORDER_CRM}/state"
ABSENT = "44444444-4444-4444-8444-444444444444"
HOUR = 3600.0
VERSIONED = re.compile(r"\d|aiohttp|python", re.I)


async def audit_records(path: Path, request_ids: set[str], deadline_s: float = 5.0) -> dict[str, dict]:
    """The audit lines of these requests, once all are written (polled with a deadline)."""
    deadline = time.monotonic() + deadline_s
    while True:
        found = {}
        if path.exists():
            for line in path.read_bytes().splitlines():
                record = json.loads(line)
                if record.get("request_id") in request_ids:
                    found[record["request_id"]] = record
        if set(found) == request_ids or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.02)


async def metric(admin_port: int, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{admin_port}/metrics") as resp:
            text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def first_audit_lines(path: Path, deadline_s: float = 5.0) -> list[dict]:
    """Every audit line, once there is one (polled with a deadline)."""
    deadline = time.monotonic() + deadline_s
    while True:
        lines = [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []
        if lines or time.monotonic() > deadline:
            return lines
        await asyncio.sleep(0.02)


def assert_problem(resp: RawResponse | None, status: int) -> dict:
    assert resp is not None, "the connection was closed without an answer"
    assert resp.status == status, (resp.status, resp.body[:300])
    assert resp.header("Content-Type") == "application/problem+json", resp.headers
    assert not VERSIONED.search(resp.header("Server") or ""), resp.header("Server")
    if not resp.body and resp.header("Content-Length") != "0":  # an answer to HEAD
        return {"request_id": resp.header("X-Request-ID")}
    body = resp.json()
    assert body["status"] == status and body["request_id"] == resp.header("X-Request-ID")
    assert not VERSIONED.search(resp.header("Server") or ""), resp.header("Server")
    return body


class Door:
    """The gateway in this process, its config, its clock, and raw connections to it."""

    def __init__(self, pki_dir: PKIFolder, config: Path, running, clock: Clock):
        self.pki, self.config_path, self.running, self.clock = pki_dir, config, running, clock
        self.port = running.config.listen.port
        self.admin = running.config.admin.port
        self.audit = running.config.audit.path

    def connect(self, client: str | tuple[Path, Path] | None, **kwargs) -> RawClient:
        cert = self.pki.client(client) if isinstance(client, str) else client
        return RawClient(self.port, self.pki.ca, cert, **kwargs)

    async def run(self, fn, *args):
        return await asyncio.to_thread(fn, *args)


@pytest.fixture
async def door(tmp_path, recorder_url):
    own = build_pki(tmp_path / "pki")
    config = write_config(tmp_path, own, recorder_url,
                          limits={"max_body_bytes": 1_000_000, "header_timeout_s": 10, "request_timeout_s": 10})
    clock = Clock()
    from gateway.shell.settings import load_config

    running = await server.start(load_config(config), clock=clock)
    try:
        yield Door(own, config, running, clock)
    finally:
        await server.stop(running, quiet=True)


# -- one pipeline for every request target, path and Expect header ---------------------

SIDE_DOORS = [
    ("encoded LF in an order path", "GET /orders/a%0Ab/state HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    ("encoded LF after /orders", "POST /orders%0a HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"),
    ("encoded CR", f"GET /orders/{ORDER_CRM}%0D/state HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    ("asterisk form", "OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    ("authority form", "CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\n\r\n"),
    ("absolute form, no path", "GET https://localhost HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    ("absolute form with an operation's path", f"GET https://localhost{STATE} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    ("HEAD of an operation", f"HEAD {STATE} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    ("empty path segment", f"GET /orders//{ORDER_CRM}/state HTTP/1.1\r\nHost: localhost\r\n\r\n"),
]


@pytest.mark.parametrize("client, status", [("crm", 404), ("stranger", 403)])
async def test_odd_request_targets_go_through_the_pipeline(door, recorder, client, status):
    """identity first (403 for a certificate no policy maps), then the operation (404), audited and counted."""
    ids = {}

    def send_all():
        for what, request in SIDE_DOORS:
            with door.connect(client) as conn:
                ids[what] = assert_problem(conn.request(request.encode()), status)["request_id"]

    await door.run(send_all)
    assert recorder.forwarded() == []
    records = await audit_records(door.audit, set(ids.values()))
    for what, request_id in ids.items():
        assert what and records[request_id]["status"] == status, what
        assert records[request_id]["client"] == ("crm" if client == "crm" else "unknown")
    label = "crm" if client == "crm" else "unknown"
    assert await metric(door.admin, "gateway_requests_total", client=label, operation="none",
                  status=str(status)) == len(SIDE_DOORS)


async def test_a_revoked_open_connection_gets_403_for_any_target_and_is_closed(door, recorder):
    def before():
        conn = door.connect("crm")
        assert conn.request(get(STATE)).status == 200
        return conn, conn.read_ticket()

    conn, session = await door.run(before)
    certs.revoke(door.pki.dir, "crm")
    assert server.reload(door.running)

    def after():
        body = assert_problem(conn.request(b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n"), 403)
        assert "revoked" in body["detail"]
        assert conn.closed_by_server()
        # a session kept from before the reload does not resume: the reloaded context has new ticket keys,
        # so the handshake is a full one and OpenSSL refuses the revoked certificate itself
        again = door.connect("crm", context=conn.context, session=session)
        assert not again.resumed and again.request(get(STATE)) is None

    await door.run(after)
    assert recorder.forwarded() == [f"GET {STATE}"]
    assert await metric(door.admin, "gateway_denied_total", client="crm", reason="revoked") == 1


async def test_intermediates_the_client_presents_are_checked_on_every_request(door, recorder, tmp_path):
    """tls.client_ca holds only the root; the client sends its issuing CA in the handshake.

    Its chain stands across a reload, and falls when the root revokes that issuing CA.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    root = pki.load_ca(door.pki.dir)
    issuing = pki.make_ca("issuing CA", not_before=NOW - DAY, not_after=NOW + 30 * DAY, issuer=root, path_length=0)
    leaf, key = pki.make_client_cert(*issuing, "crm", not_before=NOW - DAY, not_after=NOW + 10 * DAY)
    pem = serialization.Encoding.PEM
    (tmp_path / "crm-chain.crt").write_bytes(leaf.public_bytes(pem) + issuing[0].public_bytes(pem))
    pki.write_pem(tmp_path / "crm.key", key)

    def crls(revoked: list[int]) -> None:
        entries = [x509.RevokedCertificateBuilder().serial_number(n).revocation_date(NOW).build() for n in revoked]
        root_crl = pki.make_crl(*root, number=len(revoked) + 1, last_update=NOW - DAY, next_update=NOW + 10 * DAY,
                                revoked=entries)
        issuing_crl = pki.make_crl(*issuing, number=1, last_update=NOW - DAY, next_update=NOW + 10 * DAY)
        (tmp_path / "crls.pem").write_bytes(root_crl.public_bytes(pem) + issuing_crl.public_bytes(pem))

    crls([])
    config = json.loads(door.config_path.read_text())
    config["tls"].update(crl=str(tmp_path / "crls.pem"), crl_check="chain")
    door.config_path.write_text(json.dumps(config))
    from gateway.shell.settings import load_config

    door.running.config = load_config(door.config_path)
    assert server.reload(door.running)
    conn = await door.run(lambda: door.connect((tmp_path / "crm-chain.crt", tmp_path / "crm.key")))
    assert (await door.run(conn.request, get(STATE))).status == 200
    assert server.reload(door.running)  # a new trust generation: the chain is rebuilt, with the presented CA
    assert (await door.run(conn.request, get(STATE))).status == 200
    crls([issuing[0].serial_number])
    assert server.reload(door.running)
    body = assert_problem(await door.run(conn.request, get(STATE)), 403)
    assert "CA certificate CN=issuing CA" in body["detail"] and "revoked" in body["detail"]
    assert await door.run(conn.closed_by_server)
    assert recorder.forwarded() == [f"GET {STATE}"] * 2


async def test_an_issuing_ca_removed_on_reload_no_longer_serves_open_connections(door, recorder, tmp_path):
    """tls.client_ca holds the root and the issuing CA; the client sends only its own certificate.

    A reload takes the issuing CA out (its root stays): new handshakes fail, and so does the
    next request on a connection opened before, since the chain is rebuilt from what the
    client sent, not from the CAs OpenSSL took out of the old trust store.
    """
    from cryptography.hazmat.primitives import serialization

    root = pki.load_ca(door.pki.dir)
    issuing = pki.make_ca("issuing CA", not_before=NOW - DAY, not_after=NOW + 30 * DAY, issuer=root, path_length=0)
    leaf, key = pki.make_client_cert(*issuing, "crm", not_before=NOW - DAY, not_after=NOW + 10 * DAY)
    pki.write_pem(tmp_path / "crm.crt", leaf)
    pki.write_pem(tmp_path / "crm.key", key)
    pem = serialization.Encoding.PEM
    bundle = tmp_path / "client-ca.pem"
    bundle.write_bytes(root[0].public_bytes(pem) + issuing[0].public_bytes(pem))
    config = json.loads(door.config_path.read_text())
    config["tls"].update(client_ca=str(bundle), crl=None)
    door.config_path.write_text(json.dumps(config))
    from gateway.shell.settings import load_config

    door.running.config = load_config(door.config_path)
    assert server.reload(door.running)
    conn = await door.run(lambda: door.connect((tmp_path / "crm.crt", tmp_path / "crm.key")))
    assert (await door.run(conn.request, get(STATE))).status == 200
    bundle.write_bytes(root[0].public_bytes(pem))
    assert server.reload(door.running)
    body = assert_problem(await door.run(conn.request, get(STATE)), 403)
    assert "no longer chains" in body["detail"]
    assert await door.run(conn.closed_by_server)
    fresh = await door.run(lambda: door.connect((tmp_path / "crm.crt", tmp_path / "crm.key")))
    assert (await door.run(fresh.request, get(STATE))) is None
    assert recorder.forwarded() == [f"GET {STATE}"]
    assert await metric(door.admin, "gateway_denied_total", client="crm", reason="unknown_ca") == 1


def post_head(path: str, expect: list[str], length: int, content_type: str = "multipart/form-data; boundary=b") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", f"Content-Type: {content_type}",
             f"Content-Length: {length}", *(f"Expect: {e}" for e in expect)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("expect", [["foo"], ["100-continue, x"], ["100-continue", "100-continue"],
                                    ["<script>alert(1)</script>"]])
async def test_an_unknown_expectation_is_417_without_echo(door, recorder, expect):
    def send():
        with door.connect("hr-system") as conn:
            resp = conn.request(post_head("/orders", expect, 100))
            body = assert_problem(resp, 417)
            assert all(e not in resp.body.decode() for e in expect if e != "100-continue")
            assert conn.closed_by_server()  # the body was never read: the connection cannot be reused
            return body["request_id"]

    request_id = await door.run(send)
    assert recorder.seen == []
    assert (await audit_records(door.audit, {request_id}))[request_id]["status"] == 417


@pytest.mark.parametrize("client, path, status", [
    ("stranger", "/orders", 403),          # no policy maps the certificate
    ("crm", "/anonymize", 403),            # crm may not anonymize
    ("crm", "/orders%0a", 404),            # no such operation
])
async def test_100_continue_only_after_identity_operation_and_policy_admit(door, recorder, client, path, status):
    def send():
        with door.connect(client) as conn:
            conn.send(post_head(path, ["100-continue"], 100))
            first = conn.response()
            assert first is not None and first.status != 100, "100 Continue before the request was admitted"
            assert_problem(first, status)
            assert conn.closed_by_server()

    await door.run(send)
    assert recorder.seen == []


async def test_100_continue_for_an_admitted_upload(door, recorder):
    from test_gateway_requests import HR_SOLICITOR

    body = (
        b"--B\r\nContent-Disposition: form-data; name=\"solicitor\"\r\n\r\n" + HR_SOLICITOR.encode() +
        b"\r\n--B\r\nContent-Disposition: form-data; name=\"upload\"; filename=\"a.pdf\"\r\n"
        b"Content-Type: application/pdf\r\n\r\n" + sample_pdf() + b"\r\n--B--\r\n"
    )

    def send():
        with door.connect("hr-system") as conn:
            conn.send(post_head("/orders", ["100-continue"], len(body), "multipart/form-data; boundary=B"))
            interim = conn.response()
            assert interim is not None and interim.status == 100
            conn.send(body)
            final = conn.response()
            assert final is not None and final.status == 200, final
            return final.header("X-Body-SHA256")

    import hashlib

    assert await door.run(send) == hashlib.sha256(body).hexdigest()
    assert recorder.forwarded() == ["POST /orders"]


# -- credentials hold on every request, not only at the handshake ------------------------

def short_lived(door: Door, name: str, until: dt.datetime) -> tuple[Path, Path]:
    """A crm certificate from the door's CA that runs out at `until`."""
    ca = pki.load_ca(door.pki.dir)
    cert, key = pki.make_client_cert(*ca, "crm", not_before=NOW - DAY, not_after=until)
    folder = door.pki.dir / "short"
    folder.mkdir(exist_ok=True)
    pki.write_pem(folder / f"{name}.crt", cert)
    pki.write_pem(folder / f"{name}.key", key)
    return folder / f"{name}.crt", folder / f"{name}.key"


def stale_crl_in(door: Door, after: dt.timedelta) -> None:
    ca = pki.load_ca(door.pki.dir)
    crl = pki.make_crl(*ca, number=99, last_update=NOW - DAY, next_update=dt.datetime.now(dt.timezone.utc) + after)
    pki.write_pem(door.pki.dir / "crl.pem", crl)
    assert server.reload(door.running)


@pytest.mark.parametrize("tls13", [True, False], ids=["TLS1.3 ticket", "TLS1.2 session"])
@pytest.mark.parametrize("cause", ["certificate expired", "CRL past nextUpdate"])
async def test_open_and_resumed_connections_are_refused_once_credentials_lapse(door, recorder, tls13, cause):
    cert = short_lived(door, "soon", dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    if cause == "CRL past nextUpdate":
        cert = short_lived(door, "long", dt.datetime.now(dt.timezone.utc) + 10 * dt.timedelta(days=1))
        stale_crl_in(door, dt.timedelta(hours=1))
    code = "expired" if cause == "certificate expired" else "crl_expired"

    def before():
        kept = door.connect(cert, tls13=tls13)
        assert kept.request(get(STATE)).status == 200
        with door.connect(cert, context=kept.context, tls13=tls13) as first:
            assert first.request(get(STATE)).status == 200
            session = first.read_ticket() if tls13 else first.session
        with door.connect(cert, context=kept.context, session=session) as resumed:
            assert resumed.resumed and resumed.request(get(STATE)).status == 200  # resumption works
        return kept, session

    kept, session = await door.run(before)
    door.clock.advance(2 * HOUR)

    def after():
        ids = []
        body = assert_problem(kept.request(get(STATE)), 403)
        assert kept.closed_by_server()
        ids.append(body["request_id"])
        with door.connect(cert, context=kept.context, session=session) as resumed:
            body = assert_problem(resumed.request(get(STATE)), 403)
            assert resumed.resumed, "the TLS session was not resumed"
            assert resumed.closed_by_server()
            ids.append(body["request_id"])
        return ids

    ids = await door.run(after)
    assert len(recorder.forwarded()) == 3
    records = await audit_records(door.audit, set(ids))
    assert [records[i]["reason"] for i in ids] and all(records[i]["status"] == 403 for i in ids)
    assert await metric(door.admin, "gateway_denied_total", client="crm", reason=code) == 2


async def test_real_time_expiry_on_an_open_and_a_resumed_connection(door, recorder):
    """No test clock: a certificate that runs out two seconds from now, by the wall clock."""
    door.running.gateway.clock = time.time  # the real clock, as `gateway serve` has it
    until = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(seconds=2)
    cert = short_lived(door, "two-seconds", until)

    def before():
        kept = door.connect(cert)
        assert kept.request(get(STATE)).status == 200
        return kept, kept.read_ticket()

    kept, session = await door.run(before)
    await asyncio.sleep(max(0.0, until.timestamp() + 1.1 - time.time()))  # the certificate's time, not a server's

    def after():
        assert_problem(kept.request(get(STATE)), 403)
        with door.connect(cert, context=kept.context, session=session) as resumed:
            assert_problem(resumed.request(get(STATE)), 403)
            assert resumed.resumed
        try:  # a fresh handshake is refused by OpenSSL itself (TLS 1.3: the alert comes after the client's Finished)
            assert door.connect(cert, context=kept.context).request(get(STATE)) is None
        except (ssl.SSLError, ConnectionError):
            pass

    await door.run(after)
    assert len(recorder.forwarded()) == 1


async def test_a_ca_dropped_on_reload_ends_its_open_connections(door, recorder, tmp_path):
    other = pki.make_ca("another CA", not_before=NOW - DAY, not_after=NOW + 10 * DAY)
    pki.write_pem(tmp_path / "other-ca.crt", other[0])
    conn = await door.run(lambda: door.connect("crm"))
    assert (await door.run(conn.request, get(STATE))).status == 200
    config = json.loads(door.config_path.read_text())
    config["tls"].update(client_ca=str(tmp_path / "other-ca.crt"), crl=None)
    door.config_path.write_text(json.dumps(config))
    from gateway.shell.settings import load_config

    door.running.config = load_config(door.config_path)
    assert server.reload(door.running)
    body = assert_problem(await door.run(conn.request, get(STATE)), 403)
    assert "tls.client_ca" in body["detail"]
    assert await door.run(conn.closed_by_server)
    assert recorder.forwarded() == [f"GET {STATE}"]


async def test_a_certificate_with_an_empty_san_maps_by_subject_never_by_san(door, recorder, tmp_path):
    """OpenSSL accepts an empty subjectAltName, which RFC 5280 forbids and cryptography 51 will not parse:
    the certificate is still served by its subject, and a policy matching by SAN does not take it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtensionOID

    ca_cert, ca_key = pki.load_ca(door.pki.dir)
    key = pki.new_key()
    builder = (pki._builder(pki._name("crm"), ca_cert.subject, key.public_key(), NOW - DAY, NOW + DAY)
               .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
               .add_extension(x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x00"),
                              critical=False))
    cert = (tmp_path / "empty-san.crt", tmp_path / "empty-san.key")
    pki.write_pem(cert[0], builder.sign(ca_key, hashes.SHA256()))
    pki.write_pem(cert[1], key)

    def call():
        with door.connect(cert) as conn:
            return conn.request(get(STATE)), conn.request(get(f"/orders/{ORDER_HR}/state"))

    mapped, other = await door.run(call)
    assert mapped.status == 200              # crm matches by common_name
    assert_problem(other, 404)               # and its order scope holds
    assert recorder.forwarded() == [f"GET {STATE}"]


# -- leaks ---------------------------------------------------------------------------------

async def test_no_answer_names_software_versions(door):
    def front():
        servers = []
        with door.connect("crm") as conn:
            for request in (get(STATE), get("/nope"), b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
                            b"GET /\x01 HTTP/1.1\r\n\r\n"):  # the last is not HTTP: answered all the same
                resp = conn.request(request)
                assert resp is not None
                servers += resp.all("Server") or ["(none)"]
        return servers

    servers = await door.run(front)
    async with aiohttp.ClientSession() as s:
        for path in ("/metrics", "/healthz", "/readyz", "/nope"):
            async with s.get(f"http://127.0.0.1:{door.admin}{path}") as resp:
                servers += resp.headers.getall("Server", [])
    assert servers and not any(VERSIONED.search(s) for s in servers), servers


async def test_not_yours_and_absent_orders_take_the_same_time(door, recorder):
    """crm may not see hr-system's order: its 404 must not be told apart from that of an absent order."""
    recorder.latency_s = 0.002  # an upstream that looks orders up in a database
    def measure() -> tuple[float, float]:
        mine, absent = [], []
        with door.connect("crm") as conn:
            for path in (f"/orders/{ORDER_HR}/state", f"/orders/{ABSENT}/state"):  # warm both
                assert conn.request(get(path)).status == 404
            for _ in range(80):
                for path, into in ((f"/orders/{ORDER_HR}/state", mine), (f"/orders/{ABSENT}/state", absent)):
                    started = time.perf_counter()
                    resp = conn.request(get(path))
                    into.append(time.perf_counter() - started)
                    assert resp.status == 404 and resp.json()["detail"] == "no such order for this client"
        return statistics.median(mine), statistics.median(absent)

    mine, absent = await door.run(measure)
    assert max(mine, absent) / min(mine, absent) < 1.5, f"not yours {mine * 1e3:.3f} ms, absent {absent * 1e3:.3f} ms"
    assert recorder.forwarded() == []


# -- a request admitted at its head is checked again before it goes upstream ------------------

ANON_BODY = b'{"externalId":"EXTERNAL:198603052385"}'


def anonymize_head(length: int, expect: bool) -> bytes:
    return (f"POST /anonymize HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{'Expect: 100-continue' + chr(13) + chr(10) if expect else ''}\r\n").encode()


async def test_credentials_that_lapse_while_the_body_comes_stop_the_request(door, recorder):
    hr = short_lived_hr(door)

    def expired_mid_body():
        with door.connect(hr) as conn:
            conn.send(anonymize_head(len(ANON_BODY), expect=True))
            assert conn.response().status == 100
            door.clock.advance(2 * HOUR)  # the certificate runs out while the client uploads
            conn.send(ANON_BODY)
            body = assert_problem(conn.response(), 403)
            assert "expired" in body["detail"] and conn.closed_by_server()

    await door.run(expired_mid_body)
    assert recorder.seen == []


def short_lived_hr(door: Door) -> tuple[Path, Path]:
    """An hr-system certificate (matched by subject) valid for one more hour."""
    ca = pki.load_ca(door.pki.dir)
    cert, key = pki.make_client_cert(*ca, "hr-system", not_before=NOW - DAY,
                                     not_after=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    (door.pki.dir / "short").mkdir(exist_ok=True)
    pki.write_pem(door.pki.dir / "short" / "hr.crt", cert)
    pki.write_pem(door.pki.dir / "short" / "hr.key", key)
    return door.pki.dir / "short" / "hr.crt", door.pki.dir / "short" / "hr.key"


async def test_a_revocation_while_the_body_comes_stops_the_request(door, recorder):
    conn = await door.run(lambda: door.connect("hr-system"))
    await door.run(conn.send, anonymize_head(len(ANON_BODY), expect=True))
    assert (await door.run(conn.response)).status == 100  # admitted: the gateway reads the body now
    await door.run(conn.send, ANON_BODY[:5])
    certs.revoke(door.pki.dir, "hr-system")
    assert server.reload(door.running)
    await door.run(conn.send, ANON_BODY[5:])
    body = assert_problem(await door.run(conn.response), 403)
    assert "revoked" in body["detail"]
    assert recorder.seen == []


async def test_the_order_look_up_carries_no_client_conditionals(door, recorder):
    def send():
        with door.connect("hr-system") as conn:
            for order in (ORDER_CRM, ABSENT):
                resp = conn.request(get(f"/orders/{order}/state", extra="If-None-Match: *\r\n"
                                        "If-Modified-Since: Sat, 01 Jan 2000 00:00:00 GMT\r\nIf-Match: x\r\n"))
                assert_problem(resp, 404)

    await door.run(send)
    assert len(recorder.seen) == 2  # the two look-ups
    for seen in recorder.seen:
        assert not [k for k, _ in seen.headers if k.lower().startswith("if-")], seen.headers


async def test_another_clients_order_takes_as_long_as_no_order_at_all(door, recorder):
    """The look-up cache is per client: what crm has just read is no faster for hr-system to ask about.

    Each upstream answer takes 0.2 s, so a look-up answered from another client's cache
    would show as a 404 well under that.
    """
    recorder.latency_s = 0.2

    def timed(conn: RawClient, path: str, status: int) -> float:
        started = time.perf_counter()
        assert conn.request(get(path)).status == status
        return time.perf_counter() - started

    def send():
        with door.connect("crm") as crm, door.connect("hr-system") as hr:
            timed(crm, STATE, 200)                       # crm's look-up of its own order, then the call
            other = timed(hr, STATE, 404)                # hr-system: crm's order
            absent = timed(hr, f"/orders/{ABSENT}/state", 404)
            again = timed(hr, STATE, 404)                # hr-system's own answer is reused
            return other, absent, again

    other, absent, again = await door.run(send)
    assert other >= 0.2 and absent >= 0.2, (other, absent)
    assert again < 0.2, again
    lookups = [r for r in recorder.seen if r.path == f"/orders/{ORDER_CRM}"]
    assert len(lookups) == 2  # crm's, then hr-system's own


async def test_a_client_that_leaves_while_its_order_is_looked_up_is_gone_not_refused(door, recorder):
    """The credentials are checked again once the decision is made; by then the client may have left,
    and its line says so (499 client_gone), not that a refusal was not sent."""
    recorder.latency_s = 0.2

    def send():
        with door.connect("crm") as conn:
            conn.send(get(STATE))

    await door.run(send)
    gone = await first_audit_lines(door.audit)
    assert [(r["status"], r["code"], r["complete"]) for r in gone] == [(499, "client_gone", False)]
    assert "403" not in gone[0]["reason"]
    assert [r.path for r in recorder.seen] == [f"/orders/{ORDER_CRM}"]   # the look-up, never the call


async def test_a_client_that_leaves_mid_body_is_audited_not_an_error(door, recorder):
    def send():
        with door.connect("hr-system") as conn:
            conn.send(anonymize_head(100, expect=False) + b'{"externalId"')

    await door.run(send)
    gone = await first_audit_lines(door.audit)
    assert [(r["status"], r["complete"]) for r in gone] == [(499, False)]
    assert await metric(door.admin, "gateway_denied_total", client="hr-system", reason="internal") == 0
    assert recorder.seen == []


async def test_an_upload_cut_half_way_is_audited_with_the_bytes_that_came(door, recorder):
    sent = b"--b\r\n" + b"x" * 200_000

    def send():
        with door.connect("hr-system") as conn:
            conn.send(post_head("/orders", ["100-continue"], 500_000))
            assert conn.response().status == 100
            conn.send(sent)

    await door.run(send)
    gone = await first_audit_lines(door.audit)
    assert [(r["status"], r["operation"]) for r in gone] == [(499, "create_order")]
    assert 0 < gone[0]["bytes_in"] <= len(sent)
    assert recorder.seen == []


async def test_a_malformed_chunk_after_the_head_is_400_at_once(door, recorder):
    def send():
        with door.connect("hr-system") as conn:
            conn.send(b"POST /anonymize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
            assert conn.response().status == 100  # the head is taken: what follows is inside the body
            started = time.monotonic()
            conn.send(b"5\r\n{\"ext\r\nzz\r\n")
            assert_problem(conn.response(), 400)
            return time.monotonic() - started

    assert await door.run(send) < 2.0
    assert recorder.seen == []


@pytest.mark.parametrize("line", [f"GET {STATE} HTTP/2.0", f"GET {STATE} HTTP/1.9"])
async def test_only_http_1_is_served(door, recorder, line):
    resp = await door.run(lambda: door.connect("crm").request(f"{line}\r\nHost: x\r\n\r\n".encode()))
    assert resp is not None and resp.status in (400, 505)
    assert recorder.seen == []


async def test_no_100_continue_for_a_body_type_that_will_be_refused(door, recorder):
    def send():
        with door.connect("hr-system") as conn:
            conn.send(post_head("/anonymize", ["100-continue"], 10, content_type="text/plain"))
            assert_problem(conn.response(), 415)

    await door.run(send)
    assert recorder.seen == []
