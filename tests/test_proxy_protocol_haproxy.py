"""A real HAProxy in TCP mode in front of two gateways (listen.proxy_protocol), sharing rate limits in Redis.

HAProxy takes clients on 127.0.0.1 and speaks PROXY v1 to one gateway and v2 to the other, with
health checks that send a header too (v2: LOCAL). The client connects from 127.0.0.2: the audit
lines' `remote` being 127.0.0.2, where the gateways' own peer is HAProxy at 127.0.0.1, shows that
the address came through the header. Needs `haproxy` and `redis-server` (skip locally, fail under CI=true).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from conftest import free_port, gateway_command, need_programs, stop_process
from gateway.shell.settings import load_config
from gateway_harness import ORDER_CRM, POLICIES, client_context, gateway_running, write_config
from test_gateway_metrics import scrape, value
from test_ratelimit_redis import redis_server  # noqa: F401  (the fixture)

CLIENT_ADDRESS = "127.0.0.2"
STATE = f"/orders/{ORDER_CRM}/state"


def haproxy_config(front: int, stats: int, backends: list[int]) -> str:
    return f"""\
global
    maxconn 200
    stats socket ipv4@127.0.0.1:{stats} level user

defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s

frontend clients
    bind 127.0.0.1:{front}
    default_backend gateways

backend gateways
    balance roundrobin
    server v1 127.0.0.1:{backends[0]} send-proxy check check-send-proxy inter 100ms fall 3 rise 1
    server v2 127.0.0.1:{backends[1]} send-proxy-v2 check check-send-proxy inter 100ms fall 3 rise 1
"""


def checks_passed(stats: int) -> dict[str, str]:
    """HAProxy's runtime API: each gateway server's last health check status (L4OK: connected, header sent)."""
    with socket.create_connection(("127.0.0.1", stats), timeout=2) as sock:
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    columns = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(columns, line.split(","))) for line in lines[1:] if line]
    return {r["svname"]: r["check_status"] for r in rows if r["pxname"] == "gateways" and r["svname"] in ("v1", "v2")}


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def haproxy(tmp_path):
    """Start HAProxy (foreground) in front of the given backend ports; yields a function that does it."""
    exe = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if exe is None:
        need_programs("haproxy")
    procs = []

    def start(backends: list[int]) -> tuple[int, int]:
        front, stats = free_port(), free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(haproxy_config(front, stats, backends))
        check = subprocess.run([exe, "-c", "-f", str(cfg)], capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        proc = subprocess.Popen([exe, "-f", str(cfg), "-db"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        deadline = time.monotonic() + 10
        while not (accepts(front) and accepts(stats)):
            assert proc.poll() is None, f"haproxy exited with {proc.returncode}: {proc.stdout.read()[-2000:]}"
            assert time.monotonic() < deadline, "haproxy did not listen within 10 s"
            time.sleep(0.02)
        return front, stats

    yield start
    for proc in procs:
        stop_process(proc, timeout_s=5)
        proc.stdout.close()


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


async def test_haproxy_in_front_of_two_gateways(tmp_path, test_pki, recorder_url, redis_server, haproxy):  # noqa: F811
    need_programs("redis-server")
    policies = {**POLICIES, "crm": {**POLICIES["crm"], "rate_limit": {"per_minute": 6, "burst": 6}}}
    configs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        configs.append(write_config(tmp_path / name, test_pki, recorder_url, policies=policies,
                                    listen={"host": "127.0.0.1", "port": free_port(), "proxy_protocol": True,
                                            "trusted_proxies": ["127.0.0.1/32"]},
                                    rate_limit={"storage": redis_server}))
    loaded = [load_config(c) for c in configs]
    async with gateway_running(configs[0]), gateway_running(configs[1]):
        front, stats = await asyncio.to_thread(haproxy, [c.listen.port for c in loaded])
        connector = aiohttp.TCPConnector(ssl=client_context(test_pki, test_pki.client("crm")),
                                         local_addr=(CLIENT_ADDRESS, 0), force_close=True)
        statuses = []
        async with aiohttp.ClientSession(connector=connector) as s:
            for _ in range(10):
                async with s.get(f"https://localhost:{front}{STATE}") as resp:
                    await resp.read()
                    statuses.append(resp.status)
        # the burst of 6 is shared: 6 answers, then 429 whichever gateway HAProxy picks
        assert statuses == [200] * 6 + [429] * 4, statuses

        deadline = time.monotonic() + 5
        while True:
            audits = [audit_lines(tmp_path / name / "data" / "audit.jsonl") for name in ("a", "b")]
            if sum(map(len, audits)) >= 10 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        assert all(audits), "HAProxy's round robin reached both gateways (v1 and v2)"
        assert sum(map(len, audits)) == 10
        assert {record["remote"] for lines in audits for record in lines} == {CLIENT_ADDRESS}
        assert sorted(r["status"] for lines in audits for r in lines) == [200] * 6 + [429] * 4
        # one command checks both instances' chains, a line each
        files = [str(tmp_path / name / "data" / "audit.jsonl") for name in ("a", "b")]
        verified = await asyncio.to_thread(subprocess.run, gateway_command("audit", "verify", *files),
                                           capture_output=True, text=True, timeout=60)
        assert verified.returncode == 0, verified.stderr
        assert [line.split(": ", 1)[0] for line in verified.stdout.splitlines()] == files
        assert all(": OK " in line for line in verified.stdout.splitlines())

        # HAProxy's health checks (a header, v2 LOCAL for one, then nothing) have passed on both: neither
        # gateway counts them as refused connections or failed handshakes
        deadline = time.monotonic() + 5
        while (passed := await asyncio.to_thread(checks_passed, stats)) != {"v1": "L4OK", "v2": "L4OK"}:
            assert time.monotonic() < deadline, passed
            await asyncio.sleep(0.05)
        for config in loaded:
            families = await scrape(config.admin)
            assert value(families, "gateway_connections_refused_total", reason="proxy_protocol") == 0
            assert not [s for s in families["gateway_tls_handshake_failures"]
                        if s.name.endswith("_total") and s.value], families["gateway_tls_handshake_failures"]
