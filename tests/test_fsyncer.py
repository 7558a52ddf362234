"""The audit log's fsync helper process: answers, errors, its death, its restart, and that it never outlives us."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from gateway.shell.audit_writer import AuditWriter
from gateway.shell.fsyncer import Fsyncer
from test_embedded_supervision import state_of


def gone(pid: int, deadline_s: float = 10) -> bool:
    deadline = time.monotonic() + deadline_s
    while state_of(pid) not in (None, "Z"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


async def test_fsyncs_a_file_and_passes_an_error_back(tmp_path):
    syncer = Fsyncer()
    try:
        fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"line\n")
        await syncer.fsync(fd)
        await syncer.fsync(fd)  # the same helper, again
        read, write = os.pipe()  # a pipe cannot be fsync'ed: the helper's errno comes back
        with pytest.raises(OSError) as caught:
            await syncer.fsync(write)
        assert caught.value.errno == errno.EINVAL
        await syncer.fsync(fd)  # an error does not end the helper
        for x in (fd, read, write):
            os.close(x)
    finally:
        syncer.close()


async def test_a_helper_that_died_is_an_error_once_then_started_again(tmp_path):
    syncer = Fsyncer()
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        syncer.start()
        first = syncer.pid
        os.kill(first, signal.SIGKILL)
        with pytest.raises(OSError) as caught:
            await syncer.fsync(fd)
        assert caught.value.errno == errno.EIO and "helper" in str(caught.value)
        await syncer.fsync(fd)
        assert syncer.pid not in (None, first)
    finally:
        syncer.close()
        os.close(fd)


async def test_the_helper_ignores_ctrl_c_and_ends_with_its_socket(tmp_path):
    syncer = Fsyncer()
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        syncer.start()
        pid = syncer.pid
        await syncer.fsync(fd)
        os.kill(pid, signal.SIGINT)  # what a Ctrl-C sends the whole process group
        os.kill(pid, signal.SIGTERM)
        await syncer.fsync(fd)  # still there: the gateway's last lines are fsync'ed while it drains
        assert syncer.pid == pid
    finally:
        syncer.close()
        os.close(fd)
    assert state_of(pid) is None  # ended and reaped


def test_the_helper_exits_when_its_parent_is_killed(tmp_path):
    """A gateway killed with SIGKILL closes nothing itself: the helper sees its socket close and exits."""
    script = ("import asyncio, os, sys, time\n"
              "from gateway.shell.fsyncer import Fsyncer\n"
              "s = Fsyncer(); s.start()\n"
              f"fd = os.open({str(tmp_path / 'log')!r}, os.O_WRONLY | os.O_CREAT, 0o600)\n"
              "asyncio.run(s.fsync(fd))\n"
              "print(s.pid, flush=True)\n"
              "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        helper = int(parent.stdout.readline())
        assert state_of(helper) not in (None, "Z")
        parent.kill()
        parent.wait(timeout=10)
        assert gone(helper), "the fsync helper outlived the process that started it"
    finally:
        parent.kill()
        parent.wait()


async def test_the_audit_writer_survives_its_helper_dying(tmp_path):
    """A helper killed between two groups: that group is retried (cut back, written again), none is lost."""
    writer = AuditWriter(tmp_path / "audit.jsonl", None, None, "answer")
    await writer.start()
    try:
        await writer.commit({"request_id": "r1"}, 5)
        os.kill(writer._fsyncer.pid, signal.SIGKILL)
        await writer.commit({"request_id": "r2"}, 5)  # waits out one failed write and its retry
        await writer.commit({"request_id": "r3"}, 5)
    finally:
        await writer.close()
    lines = (tmp_path / "audit.jsonl").read_bytes().splitlines()
    proc = subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", str(tmp_path / "audit.jsonl")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [b'"request_id":"r%d"' % i in line for i, line in enumerate(lines, 1)] == [True] * 3
