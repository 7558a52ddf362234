"""Faults an operator injects: a killed gateway, a port already taken, a hung child, an audit log that
goes away, a disk that fills up, a client that leaves before its answer."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import pytest

from conftest import wait_http
from gateway.core.audit import verify
from gateway.runtime.embedded import EmbeddedReference
from gateway.shell.settings import load_config
from gateway_harness import ORDER_CRM, ORDER_SLOW, POLICIES, client_context, gateway_running, session, write_config
from test_embedded_supervision import children, state_of

STATE = f"/orders/{ORDER_CRM}/state"


def lines(path) -> list[dict]:
    return [json.loads(raw) for raw in path.read_bytes().splitlines()]


def verified(path) -> int:
    with open(path, "rb") as f:
        result = verify(f, None)
    assert result.ok, result
    return result.records


async def until(condition, deadline_s: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + deadline_s
    while True:
        result = await condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not within {deadline_s}s"
        await asyncio.sleep(0.05)


async def status(test_pki, url: str, path: str = STATE) -> int | None:
    try:
        async with session(test_pki, test_pki.client("crm")) as s:
            async with s.get(url + path) as resp:
                await resp.read()
                return resp.status
    except aiohttp.ClientError:
        return None


# -- the embedded upstream ------------------------------------------------------------------

def test_a_killed_gateway_takes_its_embedded_api_with_it(tmp_path, test_pki, run_gateway):
    config_path = write_config(tmp_path, test_pki, "embedded", policies={"crm": POLICIES["crm"]})
    config = load_config(config_path)
    proc = run_gateway("serve", "-c", str(config_path))
    wait_http(f"http://127.0.0.1:{config.admin.port}/healthz", proc, deadline_s=40)
    (child,) = children(proc.pid)
    (helper,) = set(children(proc.pid, helpers=True)) - {child}  # the audit log's helper process
    proc.send_signal(signal.SIGKILL)  # no cleanup at all
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while state_of(child) not in (None, "Z") or state_of(helper) not in (None, "Z"):
        assert time.monotonic() < deadline, "the embedded API or the audit log's helper outlived the gateway"
        time.sleep(0.05)


def test_serve_refuses_a_reference_port_something_else_serves(tmp_path, test_pki, run_gateway):
    config_path = write_config(tmp_path, test_pki, "embedded", policies={"crm": POLICIES["crm"]})
    host, port = load_config(config_path).reference_api.listen.rsplit(":", 1)
    with socket.socket() as squatter:
        squatter.bind((host, int(port)))
        squatter.listen()
        proc = run_gateway("serve", "-c", str(config_path))
        assert proc.wait(timeout=30) == 1
    err = proc.stderr.read().strip()
    assert "reference_api.listen" in err and "already in use" in err and len(err.splitlines()) == 1


def test_a_hung_embedded_api_is_killed_so_that_it_is_restarted(tmp_path, test_pki):
    config = load_config(write_config(tmp_path, test_pki, "embedded"))
    reference = EmbeddedReference(config)
    reference.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for _ in range(2):
            reference.probed(False)
        assert reference.proc.poll() is None  # two missed probes: still given a chance
        reference.probed(True)
        reference.probed(False)
        reference.probed(False)
        assert reference.proc.poll() is None  # an answer in between starts the count again
        reference.probed(False)
        assert reference.proc.wait(timeout=5) == -signal.SIGKILL  # tick() restarts it like any exit
    finally:
        if reference.proc.poll() is None:
            reference.proc.kill()


async def test_the_probe_tells_a_stopped_child_from_a_live_one(tmp_path, test_pki):
    config = load_config(write_config(tmp_path, test_pki, "embedded"))
    reference = EmbeddedReference(config)
    assert not await reference.probe(timeout_s=0.5)  # nothing listens
    await asyncio.get_running_loop().run_in_executor(None, reference.start)
    try:
        assert await reference.probe()
        os.kill(reference.proc.pid, signal.SIGSTOP)  # hung: the port accepts, nothing answers
        assert not await reference.probe(timeout_s=0.5)
        os.kill(reference.proc.pid, signal.SIGCONT)
    finally:
        reference.stop()


# -- the audit log ---------------------------------------------------------------------------

async def test_a_log_unreachable_at_start_continues_its_chain_once_back(tmp_path, test_pki, recorder_url):
    config = write_config(tmp_path, test_pki, recorder_url, audit={"path": "store/audit.jsonl"})
    async with gateway_running(config) as (url, _):
        for _ in range(3):
            assert await status(test_pki, url) == 200
    (tmp_path / "store").rename(tmp_path / "away")  # the log's folder cannot be used when the gateway starts
    (tmp_path / "store").write_text("a file where the folder should be")
    async with gateway_running(config) as (url, _):
        assert await status(test_pki, url) == 503
        (tmp_path / "store").unlink()
        (tmp_path / "away").rename(tmp_path / "store")

        async def served():
            return await status(test_pki, url) == 200

        await until(served, what="served again")
    records = lines(tmp_path / "store" / "audit.jsonl")
    assert verified(tmp_path / "store" / "audit.jsonl") == len(records) >= 5  # one chain, old and new lines
    assert [r["status"] for r in records][:3] == [200, 200, 200] and 503 in [r["status"] for r in records]


async def test_a_removed_log_file_is_started_again_and_says_so(tmp_path, test_pki, recorder_url):
    config = write_config(tmp_path, test_pki, recorder_url)
    log = tmp_path / "data" / "audit.jsonl"
    async with gateway_running(config) as (url, _):
        assert await status(test_pki, url) == 200
        last = lines(log)[-1]["hash"]
        log.unlink()
        assert await status(test_pki, url) == 200
    records = lines(log)
    assert records[0]["event"] == "reopened" and records[0]["previous_hash"] == last
    assert verified(log) == 2


async def test_a_renamed_log_file_as_logrotate_does_it(tmp_path, test_pki, recorder_url):
    config = write_config(tmp_path, test_pki, recorder_url)
    log = tmp_path / "data" / "audit.jsonl"
    async with gateway_running(config) as (url, _):
        assert await status(test_pki, url) == 200
        log.rename(tmp_path / "data" / "audit.jsonl.1")
        assert await status(test_pki, url) == 200
    old, new = lines(tmp_path / "data" / "audit.jsonl.1"), lines(log)
    assert len(old) == 1 and new[0]["event"] == "reopened" and new[0]["previous_hash"] == old[-1]["hash"]
    assert verified(tmp_path / "data" / "audit.jsonl.1") == 1 and verified(log) == 2


async def test_a_disk_that_fills_and_frees_some_room(tmp_path, test_pki, recorder_url):
    """The log may grow no further (RLIMIT_FSIZE stands in for a full disk): 503s, a backlog that stays
    small however long it lasts, and recovery once some room is back, with one unbroken chain."""
    config_path = write_config(tmp_path, test_pki, recorder_url, policies={"crm": POLICIES["crm"]})
    config = load_config(config_path)
    env_limit = 48 * 1024
    proc = subprocess.Popen(
        [shutil.which("gateway") or sys.executable, *([] if shutil.which("gateway") else ["-m", "gateway"]),
         "serve", "-c", str(config_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (env_limit, resource.RLIM_INFINITY)))
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{config.admin.port}/healthz", proc)
        port = config.listen.port

        async def hammer(n: int) -> list[int | None]:
            connector = aiohttp.TCPConnector(limit=8, ssl=client_context(test_pki, test_pki.client("crm")))
            async with aiohttp.ClientSession(connector=connector) as s:
                async def one():
                    try:
                        async with s.get(f"https://localhost:{port}{STATE}") as resp:
                            await resp.read()
                            return resp.status
                    except aiohttp.ClientError:
                        return None
                return await asyncio.gather(*(one() for _ in range(n)))

        got = await hammer(1500)
        assert got.count(503) > 1000  # the log filled up early on
        for pid in [proc.pid, *children(proc.pid, helpers=True)]:  # the gateway and its audit log's helper
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (env_limit + 1024 * 1024, resource.RLIM_INFINITY))
        deadline = time.monotonic() + 20
        while await hammer(1) != [200]:
            assert time.monotonic() < deadline, "not served again after room was freed"
            await asyncio.sleep(0.2)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 20)
    log = tmp_path / "data" / "audit.jsonl"
    records = lines(log)
    summaries = [r for r in records if r.get("event") == "summarised"]
    assert summaries and summaries[0]["count"] > 0 and summaries[0]["status"] == 503
    assert verified(log) == len(records)


# -- clients that leave -------------------------------------------------------------------------

async def test_a_client_that_leaves_before_its_answer_is_recorded_as_gone(tmp_path, test_pki, recorder_url):
    config = write_config(tmp_path, test_pki, recorder_url,
                          upstream={"url": recorder_url, "timeout_s": 10})
    async with gateway_running(config) as (url, _):
        async with session(test_pki, test_pki.client("crm")) as s:
            with pytest.raises(asyncio.TimeoutError):
                async with s.get(f"{url}/orders/{ORDER_SLOW}/state", timeout=aiohttp.ClientTimeout(total=0.5)):
                    pass

        async def recorded():
            log = tmp_path / "data" / "audit.jsonl"
            return [r for r in lines(log) if r.get("order_id") == ORDER_SLOW] if log.exists() else []

        (record,) = await until(recorded, deadline_s=10, what="the slow request's line")
    assert record["status"] == 499 and record["complete"] is False and "not sent" in record["reason"]


async def test_a_log_folder_that_turns_into_a_file_is_503_then_recovers(tmp_path, test_pki, recorder_url):
    config = write_config(tmp_path, test_pki, recorder_url, audit={"path": "logs/audit.jsonl"})
    async with gateway_running(config) as (url, running):
        assert await status(test_pki, url) == 200
        (tmp_path / "logs").rename(tmp_path / "away")
        (tmp_path / "logs").write_text("not a folder")  # stat fails with "not a directory", not "not found"

        async def refused():
            return await status(test_pki, url) == 503

        await until(refused, what="503 while the log's path is unusable")
        assert not running.gateway.audit.healthy
        (tmp_path / "logs").unlink()
        (tmp_path / "away").rename(tmp_path / "logs")

        async def served():
            return await status(test_pki, url) == 200

        await until(served, what="served again")
    assert verified(tmp_path / "logs" / "audit.jsonl") >= 3


async def test_a_log_rotated_while_it_could_not_be_written_starts_a_clean_chain(tmp_path):
    """Disk full (RLIMIT_FSIZE stands in), the file rotated meanwhile, room back: both files verify,
    the waiting lines are sealed into the new chain, and a redacted value keeps its pseudonym."""
    from gateway.core.audit import Redactor
    from gateway.shell.audit_writer import AuditUnavailable, AuditWriter

    log = tmp_path / "audit.jsonl"
    writer = AuditWriter(log, None, Redactor(["remote"], b"k" * 32))
    await writer.start()
    await writer.commit({"request_id": "a", "remote": "10.0.0.1"}, 5)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    helper = writer._appender.pid  # the process that appends to the log
    try:
        resource.prlimit(helper, resource.RLIMIT_FSIZE, (log.stat().st_size + 10, hard))
        with pytest.raises(AuditUnavailable):
            await writer.commit({"request_id": "b", "remote": "10.0.0.1"}, 0.6)
        assert not writer.healthy
        log.rename(tmp_path / "audit.jsonl.1")
    finally:
        resource.prlimit(helper, resource.RLIMIT_FSIZE, (soft, hard))
    await writer.commit({"request_id": "c", "remote": "10.0.0.1"}, 5)
    await writer.close()
    old, new = lines(tmp_path / "audit.jsonl.1"), lines(log)
    assert [r.get("request_id") for r in old] == ["a"] and verified(tmp_path / "audit.jsonl.1") == 1
    assert [r.get("event") or r["request_id"] for r in new] == ["reopened", "b", "c"] and verified(log) == 3
    assert new[0]["previous_hash"] == old[0]["hash"]
    assert old[0]["remote"] == new[1]["remote"] == new[2]["remote"]  # sealed twice, redacted once
