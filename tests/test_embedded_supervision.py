"""The embedded reference API is supervised: reaped at once, restarted with back-off, counted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import aiohttp

from conftest import order_form
from gateway.runtime.embedded import Backoff
from gateway_harness import session
from test_gateway_ops import metric
from test_gateway_serve import served  # noqa: F401  (the fixture: gateway serve on the embedded API)


def children(pid: int, helpers: bool = False) -> list[int]:
    """The child processes of `pid`: the embedded API, and the audit log's helper process if `helpers`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and (helpers or not is_audit_helper(int(stat.parent.name))):
            found.append(int(stat.parent.name))
    return found


def is_audit_helper(pid: int) -> bool:
    try:
        return b"appender_child.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def state_of(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None  # gone: reaped


async def ready(config) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{config.admin.port}/readyz") as resp:
            return resp.status


async def test_a_killed_upstream_is_reaped_restarted_and_counted(served, test_pki):
    config, proc = served
    url = f"https://localhost:{config.listen.port}"
    async with session(test_pki, test_pki.client("hr-system")) as s:
        async with s.post(f"{url}/orders", data=order_form()) as resp:
            assert resp.status == 200, await resp.text()
            order_id = await resp.text()

        async def state() -> tuple[int, float]:
            started = time.monotonic()
            async with s.get(f"{url}/orders/{order_id}/state") as resp:
                await resp.read()
                return resp.status, time.monotonic() - started

        waits = []
        for round_ in (1, 2):
            (child,) = children(proc.pid)
            os.kill(child, signal.SIGKILL)
            statuses = []
            deadline = time.monotonic() + 20
            while True:
                status, took = await state()
                statuses.append(status)
                assert status in (200, 502) and took < 1.0, (status, took)  # 502 promptly, never a hang
                if status == 502 and round_ == 1 and statuses.count(502) == 1:
                    assert await ready(config) == 503
                if status == 200 and 502 in statuses:
                    break
                assert time.monotonic() < deadline, "the upstream did not come back"
                await asyncio.sleep(0.05)
            assert state_of(child) is None, "the killed child was not reaped"
            assert await asyncio.to_thread(metric, config.admin.port, "gateway_upstream_restarts_total") == round_
            waits.append(statuses.count(502))
        assert await ready(config) == 200  # and the orders it stored are still there (state was 200)
    (last,) = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    exits = [e for e in events if e["event"] == "upstream_exited"]
    assert [e["restart_in_s"] for e in exits] == [0.5, 1.0]  # it died again soon after a restart: doubled
    assert len([e for e in events if e["event"] == "upstream_restarted"]) == 2
    assert state_of(last) in (None, "Z")  # stopped with the gateway (init reaps what it inherits)


def test_backoff_doubles_to_its_ceiling_and_resets_after_a_long_run():
    b = Backoff(0.5, 10)
    assert [b.take() for _ in range(7)] == [0.5, 1, 2, 4, 8, 10, 10]
    b.ran_for(9.9)
    assert b.take() == 10
    b.ran_for(10)
    assert b.take() == 0.5
