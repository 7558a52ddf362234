"""The operational log never blocks: a stdout nobody reads leaves the gateway serving, lines dropped and counted."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

from conftest import gateway_command, stop_process, wait_http
from gateway.shell import oplog
from gateway_harness import ORDER_CRM, POLICIES, session, write_config
from test_gateway_ops import metric

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def small_pipe() -> tuple[int, int]:
    """A pipe that holds one page: a reader that never reads fills it after a few lines."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    return r, w


def read_all(fd: int, deadline_s: float = 5.0, until: bytes = b"") -> bytes:
    """What the pipe holds, reading until `until` appears (or the deadline)."""
    os.set_blocking(fd, False)
    out, deadline = b"", time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            if until in out and out.endswith(b"\n"):
                break
            time.sleep(0.02)
            continue
        if not chunk:
            break
        out += chunk
    return out


def read_to_end(fd: int) -> bytes:
    with open(fd, "rb") as f:
        return f.read()


def test_a_stuck_stdout_drops_and_counts_lines_and_says_so_once_it_moves(monkeypatch):
    r, w = small_pipe()
    monkeypatch.setattr(sys, "stdout", open(w, "w", closefd=True))
    writer = oplog.Writer(capacity=5)
    dropped = []
    writer.on_drop = dropped.append
    started = time.monotonic()
    for i in range(100):
        writer.put(json.dumps({"n": i, "pad": "x" * 1000}) + "\n")
    assert time.monotonic() - started < 0.5       # never waited for the pipe
    assert not writer.drain(0.2)                  # the pipe is full: the thread is stuck, the caller is not
    assert writer.dropped == sum(dropped) >= 80
    read = []
    reader = threading.Thread(target=lambda: read.append(read_to_end(r)))
    reader.start()                                # stdout moves again
    assert writer.drain(5)
    writer.put('{"n": "after"}\n')
    assert writer.drain(5)
    sys.stdout.close()
    reader.join(5)
    lines = [json.loads(line) for line in read[0].splitlines()]
    numbers = [line["n"] for line in lines if "n" in line]
    lost = [line for line in lines if line.get("event") == "log_lines_dropped"]
    assert lost and sum(line["count"] for line in lost) == writer.dropped   # each says what was lost since the last
    assert all(ISO_UTC.fullmatch(line["ts"]) for line in lost)
    assert len([n for n in numbers if n != "after"]) + writer.dropped == 100 and numbers[-1] == "after"


EMIT = """
import sys
from gateway.shell import oplog
for batch in range(int(sys.argv[1])):
    for i in range(200):
        oplog.event("test", who=sys.argv[2], n=batch * 200 + i, pad="x" * 300)
    assert oplog.drain(30)
print(oplog.writer.dropped, file=sys.stderr)
"""


def emitters(count: int, batches: int, nonblocking: bool = False) -> tuple[list[str], list[str]]:
    """`count` processes sharing one pipe as stdout, each logging batches of 200 lines, read slowly."""
    r, w = os.pipe()
    if nonblocking:
        os.set_blocking(w, False)   # as some supervisors leave it: the flag is on the shared file description
    procs = [subprocess.Popen([sys.executable, "-c", EMIT, str(batches), f"p{i}"], stdout=w, stderr=subprocess.PIPE,
                              text=True) for i in range(count)]
    os.close(w)
    chunks = []
    with open(r, "rb", buffering=0) as pipe:
        while chunk := pipe.read(3000):
            chunks.append(chunk)
            time.sleep(0.0005)      # a slow collector: writers find the pipe full
    errors = [p.communicate(timeout=60)[1].strip() for p in procs]
    return b"".join(chunks).decode().splitlines(), errors


def test_processes_sharing_stdout_never_break_each_others_lines():
    lines, dropped = emitters(4, 3)
    events = [json.loads(line) for line in lines]          # every line whole
    assert len(events) == 4 * 600 and dropped == ["0"] * 4
    assert {(e["who"], e["n"]) for e in events} == {(f"p{i}", n) for i in range(4) for n in range(600)}


def test_a_non_blocking_stdout_is_waited_on_not_given_up():
    lines, dropped = emitters(1, 5, nonblocking=True)
    assert [json.loads(line)["n"] for line in lines] == list(range(1000)) and dropped == ["0"]


def test_log_records_are_one_json_line_with_the_error(monkeypatch, capsys):
    import logging

    handler = oplog.Handler()
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("gateway.test").makeRecord("gateway.test", logging.ERROR, __file__, 1,
                                                               "it failed: %s", ("x",), sys.exc_info())
    handler.emit(record)
    oplog.drain()
    (line,) = capsys.readouterr().out.splitlines()
    logged = json.loads(line)
    assert logged["event"] == "log" and logged["level"] == "error" and logged["message"] == "it failed: x"
    assert logged["error"] == "ValueError: boom" and "Traceback" in logged["traceback"]


async def test_serve_goes_on_when_nobody_reads_its_stdout(tmp_path, test_pki, recorder, recorder_url):
    config = write_config(tmp_path, test_pki, recorder_url, policies={"crm": POLICIES["crm"]})
    settings = json.loads(config.read_text())
    admin, port = settings["admin"]["port"], settings["listen"]["port"]
    r, w = small_pipe()
    proc = subprocess.Popen(gateway_command("serve", "-c", str(config)), stdout=w, stderr=subprocess.PIPE,
                            text=True)
    os.close(w)
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{admin}/healthz", proc)

        def reload_until_lines_drop() -> int:
            """SIGHUP after SIGHUP: each reload logs a line that stdout never takes. The admin port must
            answer throughout (urlopen's timeout fails the test when the event loop is stuck)."""
            for signals in range(1, 3000):
                proc.send_signal(signal.SIGHUP)
                time.sleep(0.01)
                if signals % 20 == 0 and metric(admin, "gateway_log_lines_dropped_total") >= 5:
                    return int(metric(admin, "gateway_config_reloads_total", result="ok"))
            raise AssertionError("no line was dropped")

        reloads = await asyncio.to_thread(reload_until_lines_drop)
        async with session(test_pki, test_pki.client("crm")) as s:   # still serving
            async with s.get(f"https://localhost:{port}/orders/{ORDER_CRM}/state") as resp:
                assert resp.status == 200
        dropped = metric(admin, "gateway_log_lines_dropped_total")
        assert dropped >= 5 and reloads > dropped

        # once stdout moves again, the log says how many lines it lost
        data = await asyncio.to_thread(read_all, r, 10.0, b"log_lines_dropped")
        events = [json.loads(line) for line in data.splitlines()]
        lost = [e for e in events if e["event"] == "log_lines_dropped"]
        assert lost and lost[0]["count"] >= dropped and all(ISO_UTC.fullmatch(e["ts"]) for e in events)
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        stop_process(proc)
        os.close(r)
    assert proc.stderr.read() == ""
