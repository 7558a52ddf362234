"""Rate limits through the gateway: shared in Redis by two processes, in memory, and with the storage down.

The Redis tests use a real `redis-server`: they skip when none is on PATH,
except when CI=true, where they fail (README).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, stop_process, wait_http
from gateway.core.policy import Rate
from gateway.shell.limits import MemoryStorage
from gateway_harness import ORDER_CRM, POLICIES, gateway_running, session, write_config

STATE = f"/orders/{ORDER_CRM}/state"
PROBLEM = "application/problem+json"


# -- a real redis-server ---------------------------------------------------------------


def _redis_missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true, so the Redis rate-limit tests must run, not skip "
                    "(install Debian's redis-server, see .ci/run)", pytrace=False)
    pytest.skip(f"{reason}: the Redis rate-limit tests need a real redis-server binary")


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(port: int, folder: Path) -> subprocess.Popen:
    """A redis-server on 127.0.0.1:port, answering PING (skips or fails as above when there is none)."""
    exe = shutil.which("redis-server")
    if exe is None:
        _redis_missing("redis-server is not on PATH")
    try:
        import redis  # noqa: F401  (RedisStorage needs the client library)
    except ImportError:
        _redis_missing("the redis Python package is not installed (pip install -e '.[test]')")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 10
    while not _ping(port):
        if proc.poll() is not None:
            pytest.fail(f"redis-server exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        if time.monotonic() > deadline:
            stop_redis(proc)
            pytest.fail(f"redis-server did not answer PING on port {port} within 10 s")
        time.sleep(0.02)
    return proc


def stop_redis(proc: subprocess.Popen) -> None:
    stop_process(proc, timeout_s=5)
    proc.stdout.close()


@pytest.fixture
def redis_server(tmp_path):
    """A throw-away redis-server on a free 127.0.0.1 port; yields its redis:// URL."""
    port = free_port()
    proc = start_redis(port, tmp_path)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_redis(proc)


# -- helpers ----------------------------------------------------------------------------


def crm_limited(rate_limit: dict) -> dict:
    """The test policies with crm's rate_limit set."""
    return {**POLICIES, "crm": {**POLICIES["crm"], "rate_limit": rate_limit}}


def config_in(dir: Path, test_pki, upstream_url: str, policies: dict, **sections) -> Path:
    dir.mkdir(parents=True, exist_ok=True)
    return write_config(dir, test_pki, upstream_url, policies=policies, **sections)


def admin_url(config: Path) -> str:
    return f"http://127.0.0.1:{json.loads(config.read_text())['admin']['port']}"


def front_url(config: Path) -> str:
    return f"https://localhost:{json.loads(config.read_text())['listen']['port']}"


async def call(s: aiohttp.ClientSession, url: str) -> tuple[int, dict, bytes, str]:
    async with s.get(url) as resp:
        return resp.status, dict(resp.headers), await resp.read(), resp.content_type


def assert_rate_limited(status: int, headers: dict, body: bytes, content_type: str, limit: int) -> None:
    assert status == 429
    assert content_type == PROBLEM
    problem = json.loads(body)
    assert problem["status"] == 429 and problem["request_id"] == headers["X-Request-ID"]
    retry = int(headers["Retry-After"])
    assert retry >= 1
    assert int(headers["RateLimit-Limit"]) == limit
    assert int(headers["RateLimit-Remaining"]) == 0
    assert int(headers["RateLimit-Reset"]) >= retry


def state_calls(recorder) -> int:
    return sum(1 for p in recorder.forwarded() if p == f"GET {STATE}")


# -- a. Redis storage decides like memory storage ------------------------------------------


async def test_redis_storage_gives_the_same_verdicts_as_memory_storage(redis_server):
    from gateway.shell.limits_redis import RedisStorage

    tag = uuid.uuid4().hex
    client = (f"crm-{tag}", Rate(6 / 60, 6))              # interval 10 s: no refill during the test
    op = (f"crm-{tag}:order_state", Rate(3 / 60, 3))      # interval 20 s
    sequence = [[client, op]] * 4 + [[client]] * 4 + [[client, op]] * 2

    memory = MemoryStorage()
    redis_storage = RedisStorage(redis_server)
    try:
        await redis_storage.ping()
        got = [await redis_storage.check(cells) for cells in sequence]
    finally:
        await redis_storage.close()
    want = [memory.check_now(cells) for cells in sequence]

    assert [v.allowed for v in want] == [True, True, True, False, True, True, True, False, False, False]
    assert [v.allowed for v in got] == [v.allowed for v in want]
    assert [v.limit for v in got] == [v.limit for v in want]
    assert [v.remaining for v in got] == [v.remaining for v in want]
    for g, w in zip(got, want):
        assert g.retry_after_s == pytest.approx(w.retry_after_s, abs=1.0)
        assert g.reset_s == pytest.approx(w.reset_s, abs=1.0)
        assert g.headers().keys() == w.headers().keys()


async def test_checks_at_the_same_time_share_round_trips_and_are_each_decided_atomically(redis_server,
                                                                                         monkeypatch):
    """60 checks at once against a burst of 10: exactly 10 pass, each with its own count of what is
    left, and they went to Redis in fewer round trips than checks."""
    from gateway.shell.limits_redis import RedisStorage

    storage = RedisStorage(redis_server)
    trips: list[int] = []
    real = RedisStorage._pipeline

    async def counted(self, batch):
        trips.append(len(batch))
        return await real(self, batch)

    monkeypatch.setattr(RedisStorage, "_pipeline", counted)
    cells = [(f"crm-{uuid.uuid4().hex}", Rate(10 / 60, 10))]
    try:
        await storage.check(cells)  # the first: loads the script (NOSCRIPT, then again)
        trips.clear()
        verdicts = await asyncio.gather(*(storage.check(cells) for _ in range(60)))
    finally:
        await storage.close()
    allowed = [v for v in verdicts if v.allowed]
    assert len(allowed) == 9  # 10, less the first check
    assert sorted(v.remaining for v in allowed) == list(range(9))
    assert all(v.remaining == 0 and v.retry_after_s > 0 for v in verdicts if not v.allowed)
    assert sum(trips) == 60 and len(trips) < 60


async def test_a_redis_that_restarts_or_loses_its_scripts_is_used_again(tmp_path):
    """Redis down: StorageError at once, not a hang; back (its script cache empty): decisions again."""
    import redis.asyncio as aioredis

    from gateway.core.ratelimit import StorageError
    from gateway.shell.limits_redis import RedisStorage

    port = free_port()
    proc = start_redis(port, tmp_path)
    storage = RedisStorage(f"redis://127.0.0.1:{port}/0")
    cells = [(f"crm-{uuid.uuid4().hex}", Rate(100, 100))]
    try:
        assert (await storage.check(cells)).allowed
        async with aioredis.from_url(storage.url) as other:
            await other.script_flush()
        assert (await storage.check(cells)).allowed  # loaded again
        stop_redis(proc)
        started = time.monotonic()
        results = await asyncio.gather(*(storage.check(cells) for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, StorageError) for r in results), results
        assert time.monotonic() - started < 5
        proc = start_redis(port, tmp_path)  # a new server: nothing of the old one's state or scripts
        verdict = await storage.check(cells)
        assert verdict.allowed and verdict.remaining == 99
    finally:
        await storage.close()
        stop_redis(proc)


# -- b. two gateway processes share one limit through Redis ---------------------------------


async def test_two_gateway_processes_share_the_limit_in_redis(tmp_path, test_pki, recorder, recorder_url,
                                                              redis_server, run_gateway):
    policies = crm_limited({"per_minute": 6, "burst": 6})
    configs = [config_in(tmp_path / name, test_pki, recorder_url, policies, rate_limit={"storage": redis_server})
               for name in ("a", "b")]
    procs = [run_gateway("serve", "-c", str(c)) for c in configs]
    for config, proc in zip(configs, procs):
        await asyncio.to_thread(wait_http, admin_url(config) + "/healthz", proc)

    answers = []
    async with session(test_pki, test_pki.client("crm")) as s:
        for i in range(12):
            answers.append((i % 2, *await call(s, front_url(configs[i % 2]) + STATE)))

    statuses = [a[1] for a in answers]
    assert statuses.count(200) == 6 and statuses.count(429) == 6, statuses
    assert statuses == [200] * 6 + [429] * 6  # one shared bucket: the first six pass, whichever gateway
    assert {a[0] for a in answers if a[1] == 429} == {0, 1}  # both gateways refuse once the bucket is empty
    for _, status, headers, body, content_type in answers[6:]:
        assert_rate_limited(status, headers, body, content_type, limit=6)
        assert int(headers["Retry-After"]) <= 10
    assert [int(a[2]["RateLimit-Remaining"]) for a in answers[:6]] == [5, 4, 3, 2, 1, 0]
    assert state_calls(recorder) == 6  # refused calls never reached the upstream


# -- c. with memory storage each process has its own bucket --------------------------------


async def test_two_gateways_with_memory_storage_do_not_share_the_limit(tmp_path, test_pki, recorder, recorder_url):
    policies = crm_limited({"per_minute": 6, "burst": 6})
    configs = [config_in(tmp_path / name, test_pki, recorder_url, policies, rate_limit={"storage": "memory"})
               for name in ("a", "b")]
    async with gateway_running(configs[0]) as (url_a, _), gateway_running(configs[1]) as (url_b, _):
        urls = [url_a, url_b]
        async with session(test_pki, test_pki.client("crm")) as s:
            answers = [await call(s, urls[i % 2] + STATE) for i in range(12)]
    assert [a[0] for a in answers] == [200] * 12
    # each gateway counted only its own six: both end with nothing left
    assert [int(a[1]["RateLimit-Remaining"]) for a in answers] == [5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0]
    assert state_calls(recorder) == 12


# -- d. the rate-limit storage is down --------------------------------------------------------


@pytest.mark.parametrize("on_error", ["deny", "allow"])
async def test_redis_down(tmp_path, test_pki, recorder, recorder_url, on_error):
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    config = config_in(tmp_path, test_pki, recorder_url, crm_limited({"per_minute": 6, "burst": 6}),
                       rate_limit={"storage": dead, "on_storage_error": on_error})
    async with gateway_running(config) as (url, _):
        async with session(test_pki, test_pki.client("crm")) as s:
            status, headers, body, content_type = await call(s, url + STATE)
        async with aiohttp.ClientSession() as plain:
            async with plain.get(admin_url(config) + "/readyz") as resp:
                ready_status, ready = resp.status, json.loads(await resp.read())

    if on_error == "deny":
        assert status == 503 and content_type == PROBLEM
        problem = json.loads(body)
        assert problem["status"] == 503 and b"Traceback" not in body
        assert state_calls(recorder) == 0
    else:
        assert status == 200 and body == b"ok"
        assert state_calls(recorder) == 1
    # readiness reports the storage either way
    assert ready_status == 503
    assert "rate_limit" in ready["problems"] and "upstream" not in ready["problems"]
    assert ready["ready"] is False


# -- e. a 429 through the gateway, memory storage -------------------------------------------------


def rate_limited_count(metrics_text: str, client: str, operation: str) -> float | None:
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if (sample.name == "gateway_rate_limited_total"
                    and sample.labels == {"client": client, "operation": operation}):
                return sample.value
    return None


async def metrics_text(config: Path) -> str:
    async with aiohttp.ClientSession() as plain:
        async with plain.get(admin_url(config) + "/metrics") as resp:
            assert resp.status == 200
            return await resp.text()


async def test_client_limit_refuses_before_the_upstream_and_is_counted(tmp_path, test_pki, recorder,
                                                                      recorder_url):
    config = config_in(tmp_path, test_pki, recorder_url, crm_limited({"per_minute": 1, "burst": 2}))
    async with gateway_running(config) as (url, _):
        async with session(test_pki, test_pki.client("crm")) as s:
            first = await call(s, url + STATE)
            second = await call(s, url + STATE)
            seen_before = len(recorder.seen)
            third = await call(s, url + STATE)
        text = await metrics_text(config)

    assert (first[0], second[0]) == (200, 200)
    assert first[1]["RateLimit-Limit"] == "2" and first[1]["RateLimit-Remaining"] == "1"
    assert second[1]["RateLimit-Remaining"] == "0"
    assert "Retry-After" not in first[1]
    assert_rate_limited(*third, limit=2)
    assert 55 <= int(third[1]["Retry-After"]) <= 60   # one request a minute
    assert len(recorder.seen) == seen_before           # nothing at all reached the upstream
    assert state_calls(recorder) == 2
    assert rate_limited_count(text, "crm", "order_state") == 1.0


async def test_operation_limit_refuses_only_that_operation(tmp_path, test_pki, recorder, recorder_url):
    config = config_in(tmp_path, test_pki, recorder_url,
                       crm_limited({"operations": {"order_state": {"per_minute": 1, "burst": 1}}}))
    async with gateway_running(config) as (url, _):
        async with session(test_pki, test_pki.client("crm")) as s:
            state_1 = await call(s, url + STATE)
            state_2 = await call(s, url + STATE)
            read_1 = await call(s, f"{url}/orders/{ORDER_CRM}")
            read_2 = await call(s, f"{url}/orders/{ORDER_CRM}")
        text = await metrics_text(config)

    assert state_1[0] == 200
    assert_rate_limited(*state_2, limit=1)
    assert (read_1[0], read_2[0]) == (200, 200)
    assert "RateLimit-Limit" not in read_1[1]  # read_order has no limit of its own and crm none overall
    assert state_calls(recorder) == 1
    assert recorder.forwarded().count(f"GET /orders/{ORDER_CRM}") == 2
    assert rate_limited_count(text, "crm", "order_state") == 1.0
    assert not rate_limited_count(text, "crm", "read_order")  # the series exists from the start, at 0
