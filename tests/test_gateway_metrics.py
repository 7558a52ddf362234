"""The admin port: the metric names and labels of docs/metrics.md, handshake failures, expiry, health."""

from __future__ import annotations

import aiohttp
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from gateway.shell.settings import load_config
from gateway_harness import ORDER_CRM, gateway_running, session, write_config

DOCUMENTED_METRICS = {
    "gateway_requests": {"client", "operation", "status"},
    "gateway_denied": {"client", "reason"},
    "gateway_rate_limited": {"client", "operation"},
    "gateway_request_duration_seconds": {"operation"},
    "gateway_upstream_duration_seconds": {"operation"},
    "gateway_tls_handshake_failures": {"reason"},
    "gateway_certificate_expiry_timestamp_seconds": {"certificate"},
    "gateway_audit_records": set(),
    "gateway_config_reloads": {"result"},
}


async def scrape(admin) -> dict[str, list]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{admin.port}/metrics") as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(families, name, **labels) -> float:
    for family in families.values():
        for sample in family:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def handshake_once(test_pki, cert, url) -> bool:
    """One TLS connection (clients may retry a failed request; this does not): did a request get an answer?"""
    import asyncio
    import socket
    import ssl

    from gateway_harness import client_context

    port = int(url.rsplit(":", 1)[1])

    def attempt() -> bool:
        ctx = client_context(test_pki, cert)
        try:
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                                 server_hostname="localhost") as sock:
                sock.sendall(f"GET /orders/{ORDER_CRM}/state HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                return sock.recv(12).startswith(b"HTTP/1.1")
        except (ssl.SSLError, ConnectionError, OSError):
            return False

    return await asyncio.get_running_loop().run_in_executor(None, attempt)


async def try_get(test_pki, cert, url) -> int | None:
    try:
        async with session(test_pki, cert) as s:
            async with s.get(url) as resp:
                await resp.read()
                return resp.status
    except (aiohttp.ClientError, ConnectionError):
        return None


@pytest.fixture
async def running(tmp_path, test_pki, recorder_url):
    config_path = write_config(tmp_path, test_pki, recorder_url)
    async with gateway_running(config_path) as (url, _):
        yield url, load_config(config_path).admin


async def test_documented_metrics_and_labels(running, test_pki):
    url, admin = running
    assert await try_get(test_pki, test_pki.client("crm"), f"{url}/orders/{ORDER_CRM}/state") == 200
    assert await try_get(test_pki, test_pki.client("stranger"), f"{url}/orders/{ORDER_CRM}/state") == 403
    assert await try_get(test_pki, test_pki.client("crm"), f"{url}/orders/{ORDER_CRM}/nope") == 404
    families = await scrape(admin)
    for name, labels in DOCUMENTED_METRICS.items():
        assert name in families, name
    for name, labels in DOCUMENTED_METRICS.items():
        for sample in families[name]:
            assert labels <= set(sample.labels) | {"le"}, (name, sample.labels)
    assert value(families, "gateway_requests_total", client="crm", operation="order_state", status="200") == 1
    assert value(families, "gateway_requests_total", client="unknown", operation="none", status="403") == 1
    assert value(families, "gateway_denied_total", client="unknown", reason="unknown_client") == 1
    assert value(families, "gateway_denied_total", client="crm", reason="no_operation") == 1
    assert value(families, "gateway_request_duration_seconds_count", operation="order_state") == 1
    assert value(families, "gateway_upstream_duration_seconds_count", operation="order_state") == 1
    assert value(families, "gateway_audit_records_total") >= 0
    # Labels come only from bounded sets: nothing a client sent appears.
    labels = {v for f in families.values() for s in f for v in s.labels.values()}
    assert not any("nope" in v for v in labels)
    # No *_created series, and gateway_ready and the dropped-log-lines counter are there.
    assert not [s.name for f in families.values() for s in f if s.name.endswith("_created")]
    assert "gateway_ready" in families and "gateway_log_lines_dropped" in families


@pytest.mark.parametrize("which, reason", [
    ("expired", "expired"), ("not-yet-valid", "not_yet_valid"), ("wrong-ca", "unknown_ca"),
    ("server-auth-only", "bad_purpose"),
])
async def test_handshake_failures_are_counted_by_reason(running, test_pki, which, reason):
    url, admin = running
    assert not await handshake_once(test_pki, test_pki.special(which), url)
    families = await scrape(admin)
    assert value(families, "gateway_tls_handshake_failures_total", reason=reason) == 1


async def test_revoked_and_missing_certificates_are_counted(running, test_pki):
    url, admin = running
    assert not await handshake_once(test_pki, test_pki.client("revoked-one"), url)
    assert not await handshake_once(test_pki, None, url)
    assert await handshake_once(test_pki, test_pki.client("crm"), url)
    families = await scrape(admin)
    assert value(families, "gateway_tls_handshake_failures_total", reason="revoked") == 1
    assert value(families, "gateway_tls_handshake_failures_total", reason="no_certificate") == 1


async def test_certificate_expiry_gauges(running, test_pki):
    _, admin = running
    families = await scrape(admin)
    server = x509.load_pem_x509_certificate((test_pki.dir / "server.crt").read_bytes())
    assert value(families, "gateway_certificate_expiry_timestamp_seconds", certificate="server") == \
        server.not_valid_after_utc.timestamp()
    crl = x509.load_pem_x509_crl((test_pki.dir / "crl.pem").read_bytes())
    assert value(families, "gateway_certificate_expiry_timestamp_seconds", certificate="crl_next_update") == \
        crl.next_update_utc.timestamp()
    assert value(families, "gateway_certificate_expiry_timestamp_seconds",
                 certificate="client_ca:CN=gateway example CA,O=gateway example") > 0


async def test_health_and_readiness(running, tmp_path, test_pki):
    _, admin = running
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{admin.port}/healthz") as resp:
            assert resp.status == 200
        async with s.get(f"http://127.0.0.1:{admin.port}/readyz") as resp:
            assert resp.status == 200 and (await resp.json())["ready"] is True


async def test_readiness_names_a_dead_upstream(tmp_path, test_pki):
    from conftest import free_port

    config_path = write_config(tmp_path, test_pki, f"http://127.0.0.1:{free_port()}")
    async with gateway_running(config_path):
        admin = load_config(config_path).admin
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{admin.port}/readyz") as resp:
                body = await resp.json()
                assert resp.status == 503 and "upstream" in body["problems"]


async def test_every_known_series_exists_from_the_first_scrape(running):
    """Before any request: series for every operation, client and fixed reason, at zero."""
    from gateway.shell.metrics import HANDSHAKE_REASONS
    from gateway.core.operations import Operation
    from gateway.core.errors import Reason

    _, admin = running
    families = await scrape(admin)

    def present(family: str, name: str, **labels) -> bool:
        return any(s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
                   for s in families[family])

    for op in [o.value for o in Operation] + ["none"]:
        assert present("gateway_upstream_duration_seconds", "gateway_upstream_duration_seconds_count", operation=op)
        assert present("gateway_request_duration_seconds", "gateway_request_duration_seconds_count", operation=op)
        for client in ("crm", "hr-system", "unknown"):
            assert present("gateway_rate_limited", "gateway_rate_limited_total", client=client, operation=op)
    for reason in Reason:
        assert present("gateway_denied", "gateway_denied_total", client="lawyer", reason=reason.value)
    for reason in HANDSHAKE_REASONS:
        assert present("gateway_tls_handshake_failures", "gateway_tls_handshake_failures_total", reason=reason)
    for result in ("ok", "error"):
        assert present("gateway_config_reloads", "gateway_config_reloads_total", result=result)
    assert present("gateway_connections_refused", "gateway_connections_refused_total", reason="limit")
    assert value(families, "gateway_denied_total", client="crm", reason="operation_not_allowed") == 0


def test_a_client_certificate_lifetime_is_the_soonest_in_use_until_a_renewal_has_taken_over():
    from gateway.shell.metrics import CERTIFICATE_IN_USE_S, Metrics

    m = Metrics()
    m.init_clients(["crm"])
    gauge = lambda: m.client_certificate_expiry.labels("crm")._value.get()  # noqa: E731
    assert gauge() == float("inf")                      # not seen yet: no alert
    m.client_certificate_seen("crm", "old", 1_000_000.0, now=0.0)
    m.client_certificate_seen("crm", "new", 9_000_000.0, now=10.0)
    assert gauge() == 1_000_000.0                       # both in use: the soonest
    m.client_certificate_seen("crm", "new", 9_000_000.0, now=10.0 + CERTIFICATE_IN_USE_S + 1)
    assert gauge() == 9_000_000.0                       # the old one unseen for a day: renewed
    m.init_clients(["crm"])                             # a reload keeps what was seen
    assert gauge() == 9_000_000.0


def test_set_expiry_removes_series_no_longer_in_use(recwarn):
    from gateway.shell.metrics import Metrics

    m = Metrics()

    def expiry():
        families = {f.name: f.samples for f in text_string_to_metric_families(m.render().decode())}
        return {s.labels["certificate"]: s.value for s in families["gateway_certificate_expiry_timestamp_seconds"]}

    m.set_expiry({"server": 1.0, "client_ca:CN=old": 2.0}, {"crl_next_update": 3.0})
    m.set_crl("crl_fetch:CN=x", 4.0, 5.0)
    assert expiry() == {"server": 1.0, "client_ca:CN=old": 2.0, "crl_fetch:CN=x": 5.0}
    m.set_expiry({"server": 1.5}, {})
    assert expiry() == {"server": 1.5}
    m.set_crl("crl_fetch:CN=x", 4.0, 6.0)   # a fetched CRL after a reload still writes both gauges
    assert expiry() == {"server": 1.5, "crl_fetch:CN=x": 6.0}
    assert not [w for w in recwarn if "multi-process" in str(w.message)]
