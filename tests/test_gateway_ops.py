"""Operating the gateway: SIGHUP reloads, revocation, SIGTERM drain, expired CRLs, report mode, workers."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import ssl
import time
import urllib.request

import pytest
from aiohttp import web

from conftest import wait_http
from gateway.shell import oplog
from gateway.tools import certs, pki
from gateway.shell.settings import load_config
from gateway_harness import (
    DAY, NOW, ORDER_CRM, POLICIES, PKIFolder, client_context, gateway_running, session, write_config,
)

STATE = f"/orders/{ORDER_CRM}/state"
CLIENT_POLICIES = {
    name: {"client": name, "match": {"common_name": name}, "allow": ["order_state", "delete_order"],
           "solicitors": [{"source": "EXTERNAL", "identifier": "*"}]}
    for name in ("alice", "bob")
}


def metric(admin_port: int, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def until(condition, deadline_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {deadline_s}s"
        time.sleep(0.05)


def handshake(test_pki: PKIFolder, cert, port: int) -> bytes | None:
    """One connection and one request; the peer's certificate (DER) when answered, None when refused."""
    ctx = client_context(test_pki, cert)
    try:
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                             server_hostname="localhost") as sock:
            sock.sendall(f"GET {STATE} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            if not sock.recv(12).startswith(b"HTTP/1.1 200"):
                return None
            return sock.getpeercert(binary_form=True)
    except (ssl.SSLError, ConnectionError, OSError):
        return None


@pytest.fixture
def own_pki(tmp_path) -> PKIFolder:
    """A PKI of this test's own: these tests revoke and rotate."""
    certs.init(tmp_path / "pki", ["alice", "bob"])
    return PKIFolder(tmp_path / "pki")


@pytest.fixture
def served(tmp_path, own_pki, recorder_url, run_gateway):
    config_path = write_config(tmp_path, own_pki, recorder_url, policies=CLIENT_POLICIES)
    config = load_config(config_path)
    proc = run_gateway("serve", "-c", str(config_path))
    wait_http(f"http://127.0.0.1:{config.admin.port}/healthz", proc)
    return config, proc


async def in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def test_sighup_after_revoke_refuses_that_client_only(served, own_pki):
    config, proc = served
    port, admin = config.listen.port, config.admin.port
    assert await in_thread(handshake, own_pki, own_pki.client("alice"), port)
    async with session(own_pki, own_pki.client("alice")) as open_alice, \
            session(own_pki, own_pki.client("bob")) as open_bob:
        async with open_alice.get(f"https://localhost:{port}{STATE}") as resp:
            assert resp.status == 200  # this keep-alive connection was made before the revocation
        async with open_bob.get(f"https://localhost:{port}{STATE}") as resp:
            assert resp.status == 200
        certs.revoke(own_pki.dir, "alice")
        proc.send_signal(signal.SIGHUP)
        await in_thread(until, lambda: metric(admin, "gateway_config_reloads_total", result="ok") == 1)
        assert await in_thread(handshake, own_pki, own_pki.client("alice"), port) is None
        assert await in_thread(handshake, own_pki, own_pki.client("bob"), port)
        async with open_alice.get(f"https://localhost:{port}{STATE}") as resp:
            body = await resp.json(content_type=None)
            assert resp.status == 403 and "revoked" in body["detail"]
        async with open_bob.get(f"https://localhost:{port}{STATE}") as resp:
            assert resp.status == 200  # an open connection of a client in good standing goes on
    assert metric(admin, "gateway_tls_handshake_failures_total", reason="revoked") == 1


async def test_sighup_rotates_the_server_certificate(served, own_pki):
    config, proc = served
    port, admin = config.listen.port, config.admin.port
    before = await in_thread(handshake, own_pki, own_pki.client("bob"), port)
    assert before
    ca = pki.load_ca(own_pki.dir)
    cert, key = pki.make_server_cert(*ca, not_before=NOW - DAY, not_after=NOW + 30 * DAY)
    pki.write_pem(own_pki.dir / "server.key", key)
    pki.write_pem(own_pki.dir / "server.crt", cert)
    proc.send_signal(signal.SIGHUP)
    await in_thread(until, lambda: metric(admin, "gateway_config_reloads_total", result="ok") == 1)
    after = await in_thread(handshake, own_pki, own_pki.client("bob"), port)
    assert after and after != before
    from cryptography.hazmat.primitives import serialization
    assert after == cert.public_bytes(serialization.Encoding.DER)
    assert metric(admin, "gateway_certificate_expiry_timestamp_seconds", certificate="server") == \
        cert.not_valid_after_utc.timestamp()


async def test_invalid_reload_keeps_the_running_configuration(served, own_pki, tmp_path):
    config, proc = served
    port, admin = config.listen.port, config.admin.port
    (tmp_path / "policies" / "broken.yaml").write_text("client: [not, a, name]\n")
    proc.send_signal(signal.SIGHUP)
    await in_thread(until, lambda: metric(admin, "gateway_config_reloads_total", result="error") == 1)
    assert await in_thread(handshake, own_pki, own_pki.client("alice"), port)
    (own_pki.dir / "server.key").write_text("not a key")
    (tmp_path / "policies" / "broken.yaml").unlink()
    proc.send_signal(signal.SIGHUP)
    await in_thread(until, lambda: metric(admin, "gateway_config_reloads_total", result="error") == 2)
    assert await in_thread(handshake, own_pki, own_pki.client("alice"), port)
    assert metric(admin, "gateway_config_reloads_total", result="ok") == 0


async def test_sigterm_finishes_the_request_in_flight(tmp_path, own_pki, aiohttp_server, run_gateway):
    arrived = asyncio.Event()

    async def slow(request):
        if request.path.endswith("/state"):
            arrived.set()
            await asyncio.sleep(1.5)
            return web.Response(text="PENDING")
        return web.json_response({"solicitor": {"source": "EXTERNAL", "identifier": "1"}})

    app = web.Application()
    app.router.add_get("/{tail:.*}", slow)
    upstream = await aiohttp_server(app)
    config_path = write_config(tmp_path, own_pki, f"http://127.0.0.1:{upstream.port}", policies=CLIENT_POLICIES)
    config = load_config(config_path)
    proc = run_gateway("serve", "-c", str(config_path))
    await in_thread(wait_http, f"http://127.0.0.1:{config.admin.port}/healthz", proc)
    async with session(own_pki, own_pki.client("bob")) as s:
        request = asyncio.create_task(s.get(f"https://localhost:{config.listen.port}{STATE}"))
        await asyncio.wait_for(arrived.wait(), 10)
        proc.send_signal(signal.SIGTERM)
        resp = await asyncio.wait_for(request, 10)
        assert resp.status == 200 and await resp.text() == "PENDING"
    assert await in_thread(proc.wait, 20) == 0
    out = proc.stdout.read()
    assert '"event": "stopping"' in out and '"event": "stop"' in out
    records = [json.loads(line) for line in (tmp_path / "data" / "audit.jsonl").read_text().splitlines()]
    assert records[-1]["status"] == 200 and records[-1]["client"] == "bob"
    assert await in_thread(handshake, own_pki, own_pki.client("bob"), config.listen.port) is None


async def test_expired_crl_refuses_everyone_loudly(tmp_path, own_pki, recorder_url, capsys):
    ca = pki.load_ca(own_pki.dir)
    stale = pki.make_crl(*ca, number=2, last_update=NOW - 3 * DAY, next_update=NOW - DAY)
    pki.write_pem(own_pki.dir / "crl.pem", stale)
    config_path = write_config(tmp_path, own_pki, recorder_url, policies=CLIENT_POLICIES)
    async with gateway_running(config_path) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        assert await in_thread(handshake, own_pki, own_pki.client("bob"), port) is None
        admin = load_config(config_path).admin.port
        assert await in_thread(lambda: metric(admin, "gateway_tls_handshake_failures_total",
                                              reason="crl_expired")) == 1
    oplog.drain()
    out = capsys.readouterr().out
    assert '"event": "crl_expired"' in out and "every client is refused" in out


async def test_fresh_crl_reload_lets_clients_back(tmp_path, own_pki, recorder_url):
    from gateway.runtime.lifecycle import reload

    ca = pki.load_ca(own_pki.dir)
    pki.write_pem(own_pki.dir / "crl.pem",
                  pki.make_crl(*ca, number=2, last_update=NOW - 3 * DAY, next_update=NOW - DAY))
    config_path = write_config(tmp_path, own_pki, recorder_url, policies=CLIENT_POLICIES)
    async with gateway_running(config_path) as (url, running):
        port = int(url.rsplit(":", 1)[1])
        assert await in_thread(handshake, own_pki, own_pki.client("bob"), port) is None
        pki.write_pem(own_pki.dir / "crl.pem",
                      pki.make_crl(*ca, number=3, last_update=NOW - DAY, next_update=NOW + 30 * DAY))
        assert reload(running)
        assert await in_thread(handshake, own_pki, own_pki.client("bob"), port)


async def test_report_mode_lets_denials_through_and_counts_them(tmp_path, test_pki, recorder_url, recorder):
    policies = {"crm": {**POLICIES["crm"], "mode": "report", "allow": ["order_state"]}}
    config_path = write_config(tmp_path, test_pki, recorder_url, policies=policies)
    async with gateway_running(config_path) as (url, _):
        async with session(test_pki, test_pki.client("crm")) as s:
            async with s.delete(f"{url}/orders/{ORDER_CRM}") as resp:
                assert resp.status == 200  # delete_order is not allowed, but the policy only reports
            async with s.post(f"{url}/orders", data=b"x", headers={"Content-Type": "text/plain"}) as resp:
                assert resp.status == 415  # a body that cannot be read is refused in report mode too
        admin = load_config(config_path).admin.port
        # both calls were outside the policy (only order_state is allowed): both counted, one got through
        assert await in_thread(lambda: metric(admin, "gateway_would_deny_total", client="crm",
                                              reason="operation_not_allowed")) == 2
    assert f"DELETE /orders/{ORDER_CRM}" in recorder.forwarded()
    records = [json.loads(line) for line in (tmp_path / "data" / "audit.jsonl").read_text().splitlines()]
    assert records[0]["decision"] == "allow" and records[0]["would_deny"] == "operation_not_allowed"
    assert records[0]["reason"].startswith("would deny")
    assert records[1]["status"] == 415 and records[1]["decision"] == "deny"


def test_workers_with_memory_rate_limits_are_refused(tmp_path, test_pki, run_gateway):
    policies = {"crm": {**POLICIES["crm"], "rate_limit": {"per_second": 5}}}
    config = write_config(tmp_path, test_pki, "http://127.0.0.1:9", policies=policies)
    proc = run_gateway("serve", "-c", str(config), "--workers", "2")
    assert proc.wait(timeout=30) == 1
    err = proc.stderr.read()
    assert "redis://" in err and "--workers 2" in err and "Traceback" not in err


async def test_operational_log_lines(tmp_path, test_pki, recorder_url, capsys):
    from gateway.runtime.lifecycle import reload

    config_path = write_config(tmp_path, test_pki, recorder_url, policies={"crm": POLICIES["crm"]})
    async with gateway_running(config_path) as (url, running):
        port = int(url.rsplit(":", 1)[1])
        for _ in range(3):
            assert await in_thread(handshake, test_pki, test_pki.special("expired"), port) is None
        assert reload(running)
        (tmp_path / "policies" / "crm.yaml").write_text("client: 5\n")
        assert not reload(running)
        running.handshakes.flush()
    oplog.drain()
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "stop"
    first = [e for e in events if e["event"] == "handshake_failure"]
    assert len(first) == 1 and first[0]["reason"] == "expired"  # the rest are summarised
    summary = [e for e in events if e["event"] == "handshake_failure_summary"]
    assert summary and summary[0]["counts"] == {"expired": 2}
    reloads = [e for e in events if e["event"] == "reload"]
    assert [r["result"] for r in reloads] == ["ok", "error"]
    assert "crm.yaml" in reloads[1]["error"] and "client" in reloads[1]["error"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["ts"]) for e in events), events
