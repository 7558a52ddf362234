"""The audit log's helper process: appends, errors, replaced files, its death, its restart, and that it
never outlives the gateway nor dies of the signals a terminal or a reload sends."""

from __future__ import annotations

import asyncio
import errno
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from gateway.shell.appender import Appender, Replaced
from gateway.shell.audit_writer import AuditWriter
from test_embedded_supervision import state_of


def gone(pid: int, deadline_s: float = 10) -> bool:
    deadline = time.monotonic() + deadline_s
    while state_of(pid) not in (None, "Z"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def opened(tmp_path):
    """An Appender and a log file open for appending: (appender, path, fd); both closed afterwards."""
    appender, log = Appender(), tmp_path / "log"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    yield appender, log, fd
    appender.close()
    os.close(fd)


async def test_appends_chunks_and_passes_an_error_back(opened):
    appender, log, fd = opened
    await appender.append(fd, str(log), b"one\n", True)
    await appender.append(fd, str(log), b"two\n" * 100000, False)  # larger than a socket buffer
    assert log.read_bytes() == b"one\n" + b"two\n" * 100000
    full = os.open("/dev/full", os.O_WRONLY)
    with pytest.raises(OSError) as caught:
        await appender.append(full, "/dev/full", b"three\n", True)
    assert caught.value.errno == errno.ENOSPC
    await appender.append(fd, str(log), b"four\n", True)  # an error does not end the helper
    assert log.read_bytes().endswith(b"two\n" * 3 + b"four\n")
    os.close(full)


async def test_a_replaced_path_writes_nothing(opened, tmp_path):
    appender, log, fd = opened
    await appender.append(fd, str(log), b"one\n", True)
    log.rename(tmp_path / "log.1")  # logrotate
    with pytest.raises(Replaced):
        await appender.append(fd, str(log), b"two\n", True)
    assert (tmp_path / "log.1").read_bytes() == b"one\n" and not log.exists()


async def test_a_helper_killed_while_idle_is_started_again_without_an_error(opened):
    appender, log, fd = opened
    appender.start()
    first = appender.pid
    os.kill(first, signal.SIGKILL)
    assert gone(first)
    await appender.append(fd, str(log), b"one\n", True)
    assert appender.pid not in (None, first) and log.read_bytes() == b"one\n"
    assert state_of(first) is None  # reaped, not left a zombie


async def test_the_helper_ignores_terminal_and_reload_signals_and_ends_with_its_socket(opened):
    appender, log, fd = opened
    await appender.append(fd, str(log), b"zero\n", True)  # started, and serving
    pid = appender.pid
    assert os.getsid(pid) == pid  # a session of its own: no terminal or process-group signal reaches it
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # Ctrl-C, a stop, `pkill -HUP gateway`
        os.kill(pid, sig)
    await appender.append(fd, str(log), b"one\n", True)  # still there: the last lines go out while draining
    assert appender.pid == pid
    appender.close()
    assert gone(pid)


def test_the_helper_exits_when_its_parent_is_killed(tmp_path):
    """A gateway killed with SIGKILL closes nothing itself: the helper sees its socket close and exits."""
    script = ("import asyncio, os, time\n"
              "from gateway.shell.appender import Appender\n"
              "a = Appender()\n"
              f"path = {str(tmp_path / 'log')!r}\n"
              "fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)\n"
              "asyncio.run(a.append(fd, path, b'x\\n', True))\n"
              "print(a.pid, flush=True)\n"
              "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        helper = int(parent.stdout.readline())
        assert state_of(helper) not in (None, "Z")
        parent.kill()
        parent.wait(timeout=10)
        assert gone(helper), "the audit log's helper outlived the process that started it"
    finally:
        parent.kill()
        parent.wait()


async def test_the_audit_writer_survives_its_helper_dying_mid_group(tmp_path, monkeypatch):
    """A helper that dies with half a group written: the group is cut back, written again, none is lost."""
    path = tmp_path / "audit.jsonl"
    writer = AuditWriter(path, None, None, "answer")
    await writer.start()
    killed: list[int] = []
    count = 1
    try:
        await writer.commit({"request_id": "r1"}, 5)
        real_outcome = Appender._outcome

        async def dies_after_saying_where(self):
            # the helper says where the chunk begins, then writes: stop it there, as far as it got
            assert select.select([self._where], [], [], 10)[0], "the helper never said where the chunk begins"
            os.kill(self.pid, signal.SIGSTOP)
            deadline = time.monotonic() + 10
            while state_of(self.pid) != "T" and time.monotonic() < deadline:  # stopped, not about to send
                time.sleep(0.001)
            if select.select([self._sock], [], [], 0)[0]:  # too late: it has answered; try the next chunk
                os.kill(self.pid, signal.SIGCONT)
                return await real_outcome(self)
            os.write(writer._fd, b'{"request_id":"r%d","st' % count)
            killed.append(self.pid)
            os.kill(self.pid, signal.SIGKILL)
            monkeypatch.undo()
            await asyncio.get_running_loop().run_in_executor(None, gone, killed[0])
            with pytest.raises(EOFError):
                await real_outcome(self)
            raise EOFError()

        monkeypatch.setattr(Appender, "_outcome", dies_after_saying_where)
        while not killed and count < 20:
            count += 1
            await writer.commit({"request_id": f"r{count}"}, 5)  # waits out one failed write and its retry
        assert killed, "the helper answered every chunk before it could be stopped"
        count += 1
        await writer.commit({"request_id": f"r{count}"}, 5)
        assert writer._appender.pid not in (None, killed[0])
    finally:
        await writer.close()
    lines = path.read_bytes().splitlines()
    proc = subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [b'"request_id":"r%d"' % i in line for i, line in enumerate(lines, 1)] == [True] * count
