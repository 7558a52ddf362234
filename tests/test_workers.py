"""`gateway serve --workers N`: one port, one admin port whose metrics add all workers up."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_http
from gateway.shell.settings import load_config
from gateway_harness import POLICIES, write_config
from test_gateway_ops import handshake, in_thread


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return {f.name: f.samples for f in text_string_to_metric_families(resp.read().decode())}


def readyz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def until(condition, deadline_s: float = 20.0):
    deadline = asyncio.get_running_loop().time() + deadline_s
    while True:
        result = await in_thread(condition)
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, "not reached in time"
        await asyncio.sleep(0.1)


async def test_two_workers_one_admin_port_added_up(tmp_path, test_pki, recorder_url, recorder, run_gateway):
    config_path = write_config(tmp_path, test_pki, recorder_url, policies={"crm": POLICIES["crm"]})
    config = load_config(config_path)
    admin = config.admin.port
    proc = run_gateway("serve", "-c", str(config_path), "--workers", "2")
    await in_thread(wait_http, f"http://127.0.0.1:{admin}/healthz", proc)
    await until(lambda: readyz(admin)[0] == 200)  # both workers have said they are ready
    for _ in range(12):  # new connections: the kernel spreads them over both workers
        assert await in_thread(handshake, test_pki, test_pki.client("crm"), config.listen.port)
    families = scrape(admin)
    served = [s for s in families["gateway_requests"] if s.name == "gateway_requests_total"
              and s.labels == {"client": "crm", "operation": "order_state", "status": "200"}]
    assert len(served) == 1 and served[0].value == 12  # one series, both workers added up
    expiry = [s for s in families["gateway_certificate_expiry_timestamp_seconds"] if s.labels["certificate"] == "server"]
    assert len(expiry) == 1  # not one per worker
    try:  # the workers open no admin ports of their own
        urllib.request.urlopen(f"http://127.0.0.1:{admin + 1}/healthz", timeout=2)
        raise AssertionError("a worker serves an admin port")
    except urllib.error.URLError:
        pass
    per_worker = {p.name for p in (tmp_path / "data").iterdir() if p.name.startswith("audit.jsonl.w")}
    assert per_worker == {"audit.jsonl.w0", "audit.jsonl.w1"}
    proc.send_signal(signal.SIGTERM)
    assert await in_thread(proc.wait, 30) == 0


async def test_readyz_answers_for_every_worker(tmp_path, test_pki, run_gateway):
    """Workers whose upstream is down make the one /readyz 503, naming each of them."""
    config_path = write_config(tmp_path, test_pki, "http://127.0.0.1:9", policies={"crm": POLICIES["crm"]})
    admin = load_config(config_path).admin.port
    proc = run_gateway("serve", "-c", str(config_path), "--workers", "2")
    await in_thread(wait_http, f"http://127.0.0.1:{admin}/healthz", proc)

    def both_reported():
        status, body = readyz(admin)
        return (status, body) if all("has not reported" not in v for v in body["problems"].values()) else None

    status, body = await until(both_reported)
    assert status == 503 and set(body["problems"]) == {"worker 0", "worker 1"}
    assert all("upstream" in v for v in body["problems"].values())


async def test_a_reload_removes_the_expiry_of_a_ca_taken_out_of_the_bundle(tmp_path, test_pki, recorder_url,
                                                                            run_gateway):
    """Multiprocess metrics cannot clear series: a removed CA's expiry must go all the same, silently."""
    import datetime as dt

    from cryptography.hazmat.primitives.serialization import Encoding

    from gateway.tools import pki

    now = dt.datetime.now(dt.timezone.utc)
    second, _ = pki.make_ca("second CA", not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=5))
    label = f"client_ca:{second.subject.rfc4514_string()}"
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(test_pki.ca.read_bytes() + second.public_bytes(Encoding.PEM))
    tls = {"cert": str(test_pki.dir / "server.crt"), "key": str(test_pki.dir / "server.key"),
           "client_ca": str(bundle), "crl": str(test_pki.dir / "crl.pem")}
    config_path = write_config(tmp_path, test_pki, recorder_url, policies={"crm": POLICIES["crm"]}, tls=tls)
    admin = load_config(config_path).admin.port
    proc = run_gateway("serve", "-c", str(config_path), "--workers", "2")
    await in_thread(wait_http, f"http://127.0.0.1:{admin}/healthz", proc)
    await until(lambda: readyz(admin)[0] == 200)

    def expiry_of(name):
        return [s.value for s in scrape(admin)["gateway_certificate_expiry_timestamp_seconds"]
                if s.labels["certificate"] == name]

    assert expiry_of(label) == [second.not_valid_after_utc.timestamp()]
    bundle.write_bytes(test_pki.ca.read_bytes())
    proc.send_signal(signal.SIGHUP)

    def both_reloaded():
        samples = scrape(admin)["gateway_config_reloads"]
        return sum(s.value for s in samples if s.labels == {"result": "ok"}) >= 2

    await until(both_reloaded)
    assert expiry_of(label) == []   # gone, not left at its old value (nor NaN) to keep an alert firing
    assert len(expiry_of("server")) == 1 and expiry_of("server")[0] > 0
    assert [s for s in scrape(admin)["gateway_certificate_expiry_timestamp_seconds"]
            if s.labels["certificate"].startswith("client_ca:")]   # the CA still in the bundle stays
    proc.send_signal(signal.SIGTERM)
    assert await in_thread(proc.wait, 30) == 0
    out, err = proc.communicate()
    assert "Clearing labels" not in out + err and "not been implemented" not in out + err
