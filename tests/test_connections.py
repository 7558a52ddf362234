"""Connections are bounded and cheap: client connections capped and counted, an idle one at most 64 KiB,
and upstream connections capped and never reused after the upstream may have dropped them."""

from __future__ import annotations

import asyncio
import resource
import ssl
import time
from pathlib import Path

import pytest

from conftest import wait_http
from gateway.shell.settings import load_config
from gateway_harness import ORDER_CRM, POLICIES, client_context, gateway_running, session, write_config
from test_gateway_ops import metric

STATE = f"/orders/{ORDER_CRM}/state"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def many_files():
    """Room for a thousand connections in this process (the gateway raises its own limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2500:
        pytest.skip(f"this machine allows only {hard} open files")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def open_idle(port: int, ctx: ssl.SSLContext | None, count: int) -> list[asyncio.StreamWriter]:
    """`count` connections; with ctx, each authenticated and answered once, then left idle."""
    async def one() -> asyncio.StreamWriter:
        if ctx is None:  # a TLS record header and nothing more: a handshake left half done
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\x16\x03\x01\x00\xa0")
            return writer
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        writer.write(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        await reader.readexactly(length)
        return writer

    writers = []
    for _ in range(0, count, 50):
        writers += await asyncio.gather(*(one() for _ in range(min(50, count - len(writers)))))
    return writers


@pytest.mark.parametrize("kind, count", [("authenticated", 1000), ("half-done handshake", 300)])
async def test_an_idle_connection_costs_at_most_64_kib(tmp_path, test_pki, run_gateway, many_files, kind, count):
    config_path = write_config(tmp_path, test_pki, "http://127.0.0.1:9", policies={"crm": POLICIES["crm"]},
                               limits={"max_body_bytes": 1_000_000, "header_timeout_s": 60, "request_timeout_s": 60})
    config = load_config(config_path)
    proc = run_gateway("serve", "-c", str(config_path))
    wait_http(f"http://127.0.0.1:{config.admin.port}/healthz", proc)
    ctx = client_context(test_pki, test_pki.client("crm")) if kind == "authenticated" else None
    warm = await open_idle(config.listen.port, ctx, 50)  # first-use allocations are not per connection
    before = rss_kib(proc.pid)
    writers = await open_idle(config.listen.port, ctx, count)
    assert await asyncio.to_thread(metric, config.admin.port, "gateway_connections_open") == count + 50
    each = (rss_kib(proc.pid) - before) / count
    for writer in warm + writers:
        writer.close()
    assert each <= 64, f"{each:.1f} KiB a {kind} connection"


async def test_connections_past_the_limit_are_closed_at_once_and_counted(tmp_path, test_pki, recorder_url):
    config = write_config(tmp_path, test_pki, recorder_url,
                          limits={"max_body_bytes": 1_000_000, "header_timeout_s": 10, "request_timeout_s": 10,
                                  "max_connections": 3})
    ctx = client_context(test_pki, test_pki.client("crm"))
    async with gateway_running(config) as (url, running):
        port, admin = running.config.listen.port, running.config.admin.port
        held = await open_idle(port, ctx, 3)
        started = time.monotonic()
        with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
            await open_idle(port, ctx, 1)
        assert time.monotonic() - started < 1.0  # closed at once, not after a timeout
        families = {}
        from prometheus_client.parser import text_string_to_metric_families
        import aiohttp

        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{admin}/metrics") as resp:
                families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
        refused = {tuple(x.labels.items()): x.value for x in families["gateway_connections_refused"].samples
                   if x.name.endswith("_total")}
        assert refused == {(("reason", "limit"),): 1.0, (("reason", "proxy_protocol"),): 0.0}
        assert families["gateway_connections_open"].samples[0].value == 3
        held.pop().close()
        for _ in range(100):  # the freed slot is usable once the gateway has seen the close
            if running.gateway.metrics.connections_open._value.get() == 2:
                break
            await asyncio.sleep(0.02)
        async with session(test_pki, test_pki.client("crm")) as s:
            async with s.get(url + STATE) as resp:
                assert resp.status == 200
        for writer in held:
            writer.close()


# -- upstream connections --------------------------------------------------------------------

class ForgetfulUpstream:
    """Closes a keep-alive connection that sat idle over 1 s the moment the next request comes on it.

    That is the race a real server's idle timeout makes: it closes just as the gateway sends,
    and the request is lost without an answer.
    """

    def __init__(self) -> None:
        self.answered = 0
        self.most_open = 0
        self.open = 0
        self.slow = 0.0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        last = time.monotonic()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length")), 0)
                await reader.readexactly(length)
                if time.monotonic() - last > 1.0:
                    return  # idle too long: closed without an answer
                if self.slow and head.startswith(b"POST "):  # the gateway's readiness probe is not slowed
                    await asyncio.sleep(self.slow)
                self.answered += head.startswith(b"POST ")  # not the gateway's readiness probe
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
                last = time.monotonic()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()


@pytest.fixture
async def forgetful():
    upstream = ForgetfulUpstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    yield upstream
    server.close()


ANON = b'{"externalId":"EXTERNAL:198603052385"}'


async def anonymize(s, url: str) -> int:
    async with s.post(f"{url}/anonymize", data=ANON, headers={"Content-Type": "application/json"}) as resp:
        return resp.status


async def test_an_upstream_that_drops_idle_connections_costs_no_post(tmp_path, test_pki, forgetful):
    """upstream.keepalive_s below the upstream's own idle timeout: the POST never lands on a dropped connection."""
    config = write_config(tmp_path, test_pki, forgetful.url, policies={"hr-system": POLICIES["hr-system"]},
                          upstream={"url": forgetful.url, "timeout_s": 5, "keepalive_s": 0.5})
    async with gateway_running(config) as (url, running):
        async with session(test_pki, test_pki.client("hr-system")) as s:
            for _ in range(2):
                assert await anonymize(s, url) == 200
                await asyncio.sleep(1.2)  # longer than the upstream keeps an idle connection: the point of the test
    assert forgetful.answered == 2


@pytest.mark.parametrize("slow, timeout_s, most, calls, statuses", [
    (0.3, 5, 2, 6, [200] * 6),        # callers past the cap wait their turn
    (1.5, 2, 1, 2, [200, 504]),       # ... within upstream.timeout_s: the wait and the answer share it
], ids=["capped and waiting", "waiting past the timeout"])
async def test_upstream_connections_are_capped(tmp_path, test_pki, forgetful, slow, timeout_s, most, calls,
                                               statuses):
    forgetful.slow = slow
    config = write_config(tmp_path, test_pki, forgetful.url, policies={"hr-system": POLICIES["hr-system"]},
                          upstream={"url": forgetful.url, "timeout_s": timeout_s, "max_connections": most})
    async with gateway_running(config) as (url, _):
        async with session(test_pki, test_pki.client("hr-system")) as s:
            assert sorted(await asyncio.gather(*(anonymize(s, url) for _ in range(calls)))) == statuses
    assert forgetful.most_open == most
