"""The audit log loses nothing that was answered: SIGKILL, torn tails, answers cut off mid-stream.

`gateway serve` runs as a real process in front of a recording upstream; the
test kills it with SIGKILL and reads the log it left. Every answer the client
received must have its line: with `audit.sync: answer` no byte of an answer
leaves before its line is fsync'ed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import signal
import subprocess

import aiohttp
import pytest

from conftest import gateway_command, wait_http
from gateway.core.audit import verify
from gateway.shell.settings import load_config
from gateway_harness import ORDER_HR, POLICIES, client_context, session, write_config
from test_gateway_requests import HR_SOLICITOR, form

POLICY = {"hr-system": POLICIES["hr-system"]}


def lines(path) -> list[dict]:
    return [json.loads(raw) for raw in path.read_bytes().splitlines() if raw.endswith(b"}")]


def start(config_path, run_gateway) -> tuple[subprocess.Popen, str]:
    config = load_config(config_path)
    proc = run_gateway("serve", "-c", str(config_path))
    wait_http(f"http://127.0.0.1:{config.admin.port}/healthz", proc)
    return proc, f"https://localhost:{config.listen.port}"


async def answered_call(s: aiohttp.ClientSession, url: str, i: int) -> str:
    """One create or delete; the X-Request-ID of its answer (the answer was received whole)."""
    if i % 2:
        resp = await s.post(f"{url}/orders", data=form([HR_SOLICITOR], upload=b"%PDF-1.4 tiny"))
    else:
        resp = await s.delete(f"{url}/orders/{ORDER_HR}")
    async with resp:
        await resp.read()
        assert resp.status == 200, resp.status
        return resp.headers["X-Request-ID"]


@pytest.mark.parametrize("run", range(3))
async def test_sigkill_right_after_the_last_of_200_answers(tmp_path, test_pki, recorder_url, run_gateway, run):
    config = write_config(tmp_path, test_pki, recorder_url, policies=POLICY)
    proc, url = start(config, run_gateway)
    ids = []
    async with session(test_pki, test_pki.client("hr-system")) as s:
        for i in range(200):
            ids.append(await answered_call(s, url, i))
        proc.send_signal(signal.SIGKILL)  # the instant the 200th answer is in
    proc.wait(timeout=10)
    written = {r.get("request_id") for r in lines(tmp_path / "data" / "audit.jsonl")}
    assert [i for i in ids if i not in written] == []


@pytest.mark.parametrize("run", range(3))
async def test_sigkill_in_the_middle_of_a_burst(tmp_path, test_pki, recorder_url, run_gateway, run):
    config = write_config(tmp_path, test_pki, recorder_url, policies=POLICY)
    proc, url = start(config, run_gateway)
    ids: list[str] = []
    stop = asyncio.Event()

    async def worker(n: int) -> None:
        connector = aiohttp.TCPConnector(ssl=client_context(test_pki, test_pki.client("hr-system")))
        async with aiohttp.ClientSession(connector=connector) as s:
            i = n
            while not stop.is_set():
                try:
                    ids.append(await answered_call(s, url, i))
                except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError):
                    return  # the gateway is gone: this answer never arrived
                i += 1

    workers = [asyncio.create_task(worker(n)) for n in range(16)]
    while len(ids) < 300 + random.randrange(300):
        await asyncio.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    received = list(ids)  # answers in before the kill (any later one could only be a failure)
    stop.set()
    await asyncio.gather(*workers)
    proc.wait(timeout=10)
    log = tmp_path / "data" / "audit.jsonl"
    written = {r.get("request_id") for r in lines(log)}
    assert len(received) >= 300 and [i for i in received if i not in written] == []

    # Whatever the kill left, the next start makes the chain whole again.
    proc, _ = start(config, run_gateway)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    with open(log, "rb") as f:
        result = verify(f, None)
    assert result.ok, result


async def test_a_torn_tail_is_moved_aside_and_put_on_record(tmp_path, test_pki, recorder_url, run_gateway):
    config = write_config(tmp_path, test_pki, recorder_url, policies=POLICY)
    proc, url = start(config, run_gateway)
    async with session(test_pki, test_pki.client("hr-system")) as s:
        for i in range(3):
            await answered_call(s, url, i)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    log = tmp_path / "data" / "audit.jsonl"
    torn = b'{"ts":"2026-11-28T10:00:00.000Z","request_id":"half-writ'
    with open(log, "ab") as f:
        f.write(torn)

    verified = subprocess.run(gateway_command("audit", "verify", str(log)), capture_output=True, text=True)
    assert verified.returncode == 1
    assert "line 4: torn tail" in verified.stderr and f"({len(torn)} bytes)" in verified.stderr

    proc, _ = start(config, run_gateway)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    aside = [p for p in log.parent.iterdir() if p.name.startswith("audit.jsonl.torn-")]
    assert len(aside) == 1 and aside[0].read_bytes() == torn
    records = lines(log)
    assert len(records) == 4
    assert records[3]["event"] == "recovered" and records[3]["torn_bytes"] == len(torn)
    assert records[3]["torn_sha256"] == hashlib.sha256(torn).hexdigest() and records[3]["torn_file"] == aside[0].name
    verified = subprocess.run(gateway_command("audit", "verify", str(log)), capture_output=True, text=True)
    assert verified.returncode == 0 and verified.stdout.strip() == "OK 4 records"


# -- an answer cut off while streaming says so --------------------------------------------

async def download_records(tmp_path, request_id) -> tuple[dict, dict]:
    log = tmp_path / "data" / "audit.jsonl"
    for _ in range(250):  # the "completed" line is queued once the transfer ends: poll for it
        found = [r for r in lines(log) if r.get("request_id") == request_id]
        if len(found) == 2:
            return found[0], found[1]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no two lines for {request_id}")


async def test_a_download_the_upstream_cuts_is_audited_incomplete(gw_process_free, recorder, tmp_path, test_pki):
    url = gw_process_free
    recorder.document_bytes, recorder.cut_after = 30 * 1024 * 1024, 8 * 1024 * 1024
    got = 0
    async with session(test_pki, test_pki.client("hr-system")) as s:
        async with s.get(f"{url}/orders/{ORDER_HR}/document") as resp:
            request_id = resp.headers["X-Request-ID"]
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in resp.content.iter_any():
                    got += len(chunk)
    answered, done = await download_records(tmp_path, request_id)
    assert answered["status"] == 200 and answered["complete"] is None and answered["bytes_out"] == 30 * 1024 * 1024
    assert done["event"] == "completed" and done["complete"] is False
    assert got <= done["bytes_out"] <= 8 * 1024 * 1024


async def test_a_download_the_client_abandons_is_audited_incomplete(gw_process_free, recorder, tmp_path, test_pki):
    url = gw_process_free
    recorder.document_bytes = 30 * 1024 * 1024
    async with session(test_pki, test_pki.client("hr-system")) as s:
        async with s.get(f"{url}/orders/{ORDER_HR}/document") as resp:
            request_id = resp.headers["X-Request-ID"]
            await resp.content.readexactly(1024 * 1024)
            resp.close()  # the client goes away with most of it unread
    answered, done = await download_records(tmp_path, request_id)
    assert done["event"] == "completed" and done["complete"] is False
    assert 1024 * 1024 <= done["bytes_out"] < 30 * 1024 * 1024


async def test_a_whole_download_is_audited_complete(gw_process_free, recorder, tmp_path, test_pki):
    url = gw_process_free
    recorder.document_bytes = 3 * 1024 * 1024
    async with session(test_pki, test_pki.client("hr-system")) as s:
        async with s.get(f"{url}/orders/{ORDER_HR}/document") as resp:
            assert len(await resp.read()) == 3 * 1024 * 1024
            request_id = resp.headers["X-Request-ID"]
    answered, done = await download_records(tmp_path, request_id)
    assert done["complete"] is True and done["bytes_out"] == 3 * 1024 * 1024 and done["status"] == 200


@pytest.fixture
async def gw_process_free(tmp_path, test_pki, recorder_url):
    """The gateway in this process (the streaming tests need no kill)."""
    from gateway_harness import gateway_running

    async with gateway_running(write_config(tmp_path, test_pki, recorder_url)) as (url, _):
        yield url

