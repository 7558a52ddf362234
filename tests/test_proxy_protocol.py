"""listen.proxy_protocol through the gateway: real TLS after a PROXY header, and connections refused before TLS."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import ssl
import struct
import time

import pytest

from gateway.core.proxy_protocol import V2_SIGNATURE
from gateway.shell.settings import load_config
from conftest import free_port
from gateway_harness import ORDER_CRM, client_context, gateway_running, write_config
from raw_tls import RawClient, RawResponse, get
from test_front_door import audit_records
from test_gateway_metrics import scrape, value

STATE = f"/orders/{ORDER_CRM}/state"


def v2_header(command: int, src: str = "", sport: int = 0, tlvs: bytes = b"") -> bytes:
    if command == 0:
        return V2_SIGNATURE + b"\x20\x00\x00\x00"
    address = ipaddress.ip_address(src)
    fam = 0x11 if address.version == 4 else 0x21
    dst = ipaddress.ip_address("10.0.0.1" if address.version == 4 else "2001:db8::1")
    body = address.packed + dst.packed + struct.pack("!HH", sport, 8443) + tlvs
    return V2_SIGNATURE + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


def request_after(port: int, prefix: bytes, test_pki, cert, pieces: int = 1) -> RawResponse | None:
    """A PROXY header (in `pieces` writes), then an mTLS handshake and one GET on the same socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    size = -(-len(prefix) // pieces) if prefix else 1
    for i in range(0, len(prefix), size):
        sock.sendall(prefix[i:i + size])
        if pieces > 1:
            time.sleep(0.005)   # separate reads on the gateway's side
    client = RawClient.__new__(RawClient)
    client.tls = client_context(test_pki, cert).wrap_socket(sock, server_hostname="localhost")
    client._buf = b""
    try:
        return client.request(get(STATE))
    finally:
        client.close()


def closed_before_tls(port: int, prefix: bytes) -> float:
    """Send `prefix`; the seconds until the gateway closed the connection without a TLS byte."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if prefix:
            sock.sendall(prefix)
        try:
            data = sock.recv(100)
        except ConnectionResetError:
            data = b""
        assert data == b"", data   # no TLS alert, no ServerHello: nothing
    return time.monotonic() - started


@pytest.fixture
async def behind_balancer(tmp_path, test_pki, recorder_url):
    config_path = write_config(tmp_path, test_pki, recorder_url,
                               listen={"host": "127.0.0.1", "port": free_port(), "proxy_protocol": True,
                                       "trusted_proxies": ["127.0.0.0/8"]},
                               limits={"max_body_bytes": 1_000_000, "header_timeout_s": 1.5,
                                       "request_timeout_s": 10})
    config = load_config(config_path)
    async with gateway_running(config_path):
        yield config, tmp_path / "data" / "audit.jsonl"


@pytest.mark.parametrize("prefix, remote, pieces", [
    (b"PROXY TCP4 203.0.113.9 10.0.0.1 40000 8443\r\n", "203.0.113.9", 1),
    (b"PROXY TCP6 2001:db8::9 2001:db8::1 40000 8443\r\n", "2001:db8::9", 1),
    (b"PROXY UNKNOWN\r\n", "127.0.0.1", 1),
    (v2_header(1, "198.51.100.4", 5555, tlvs=b"\x01\x00\x02h2\x04\x00\x03abc"), "198.51.100.4", 1),
    (v2_header(1, "2001:db8::44", 5555), "2001:db8::44", 1),
    (v2_header(0), "127.0.0.1", 1),                                   # LOCAL: the balancer's own address
    (b"PROXY TCP4 203.0.113.10 10.0.0.1 40000 8443\r\n", "203.0.113.10", 44),   # a read a byte or so
    (v2_header(1, "198.51.100.5", 5555), "198.51.100.5", 28),
])
async def test_the_header_address_is_the_remote(behind_balancer, test_pki, prefix, remote, pieces):
    config, audit = behind_balancer
    resp = await asyncio.to_thread(request_after, config.listen.port, prefix, test_pki, test_pki.client("crm"),
                                   pieces)
    assert resp is not None and resp.status == 200, resp
    request_id = resp.header("X-Request-ID")
    assert (await audit_records(audit, {request_id}))[request_id]["remote"] == remote


@pytest.mark.parametrize("prefix", [
    b"",                                                        # closed before any header
    b"\x16\x03\x01\x00\xa0\x01\x00\x00\x9c\x03\x03",            # TLS straight away: no header
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",                       # junk
    b"PROXY TCP4 203.0.113.9 10.0.0.1 99999 8443\r\n",          # a bad port
    b"PROXY TCP4 " + b"9" * 120,                                # too long
    V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12,          # v2 signature, version 3
    b"PROXY TCP4 203.0.113.9",                                  # never finished: the time limit
])
async def test_a_connection_without_a_valid_header_is_closed_before_tls(behind_balancer, prefix):
    config, _ = behind_balancer
    if prefix == b"":
        with socket.create_connection(("127.0.0.1", config.listen.port), timeout=5):
            pass   # the client hangs up at once
    else:
        took = await asyncio.to_thread(closed_before_tls, config.listen.port, prefix)
        if prefix == b"PROXY TCP4 203.0.113.9":
            assert took >= 1.4, took   # held to limits.header_timeout_s, like a handshake
        else:
            assert took < 1.0, took    # closed at once, not after the time limit
    deadline = time.monotonic() + 5
    while True:
        families = await scrape(config.admin)
        refused = value(families, "gateway_connections_refused_total", reason="proxy_protocol")
        if refused >= 1 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert refused == 1
    assert value(families, "gateway_connections_refused_total", reason="limit") == 0
    assert not [s for s in families["gateway_tls_handshake_failures"] if s.name.endswith("_total") and s.value]


async def test_an_untrusted_peer_is_closed_before_tls(tmp_path, test_pki, recorder_url, capsys):
    from gateway.shell import oplog

    config_path = write_config(tmp_path, test_pki, recorder_url,
                               listen={"host": "127.0.0.1", "port": free_port(), "proxy_protocol": True,
                                       "trusted_proxies": ["10.0.0.0/8", "2001:db8::/32"]})
    config = load_config(config_path)
    async with gateway_running(config_path):
        took = await asyncio.to_thread(closed_before_tls, config.listen.port,
                                       b"PROXY TCP4 203.0.113.9 10.0.0.1 40000 8443\r\n")
        assert took < 1.0
        families = await scrape(config.admin)
        assert value(families, "gateway_connections_refused_total", reason="proxy_protocol") == 1
    oplog.drain(1.0)
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    refused = [e for e in events if e.get("event") == "proxy_protocol_refused"]
    assert len(refused) == 1 and refused[0]["peer"] == "127.0.0.1", events
    assert "trusted_proxies" in refused[0]["detail"]


async def test_without_proxy_protocol_a_header_is_a_failed_handshake(gw, test_pki):
    port = int(gw.rsplit(":", 1)[1])
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        await asyncio.to_thread(request_after, port, b"PROXY TCP4 203.0.113.9 10.0.0.1 40000 8443\r\n",
                                test_pki, test_pki.client("crm"))


def test_settings_hold_trusted_proxies_to_cidrs(tmp_path, test_pki):
    from gateway.core.errors import SettingsError

    path = write_config(tmp_path, test_pki, "http://127.0.0.1:1",
                        listen={"host": "127.0.0.1", "port": 1, "trusted_proxies": ["10.0.0.0/8", "nope"]})
    with pytest.raises(SettingsError, match=r"trusted_proxies\[1\]"):
        load_config(path)
    path = write_config(tmp_path, test_pki, "http://127.0.0.1:1",
                        listen={"host": "127.0.0.1", "port": 1, "proxy_protocol": True})
    with pytest.raises(SettingsError, match="trusted_proxies"):
        load_config(path)
    path = write_config(tmp_path, test_pki, "http://127.0.0.1:1",
                        listen={"host": "127.0.0.1", "port": 1, "proxy_protocol": True,
                                "trusted_proxies": ["10.0.0.7", "fd00::/8"]})
    assert load_config(path).listen.trusted_proxies == ("10.0.0.7", "fd00::/8")
