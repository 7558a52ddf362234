"""The audit log's appends (write and fsync) done by a helper process, so that the event loop
neither waits for the disk nor shares the GIL with a thread that does.

A thread writing and fsyncing must take the GIL back after every system call it makes;
while the event loop is busy, each time is a handoff of the GIL between the two threads (a
loaded gateway made about three futex calls a request for it, and spent some 15-20 % more
CPU a request). Writing from the loop itself would avoid that, but a write or a stat can
block for long (a frozen filesystem, a hung network mount, dirty-page throttling), and
then the whole gateway would stop instead of answering 503. The helper
(appender_child.py, a process with its own GIL) gets the log's descriptor over a Unix
socket (SCM_RIGHTS) with the chunk, appends, fsyncs and answers; the loop waits for the
answer like for any socket read, and touches the file itself only to cut a chunk back
when the helper died half-way through it (in a thread: that is rare).

The helper is in a session of its own (no terminal or process-group signal reaches it),
ignores SIGINT, SIGTERM and SIGHUP, exits when its socket closes (the gateway stopped,
even by SIGKILL), and is started again if it died.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
import sys

from gateway.shell import appender_child
from gateway.shell.appender_child import HEADER, NOTHING, REPLACED, START


class Replaced(Exception):
    """The path no longer names the open file: nothing was written."""


class Appender:
    """append(fd, chunk) awaited on the event loop, done by the helper process; one call at a time."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._lock = asyncio.Lock()
        self._ended: list[subprocess.Popen] = []   # helpers told to end, reaped once they have

    def start(self) -> None:
        """Start the helper now rather than at the first append (a start costs a Python start-up)."""
        self._reap()
        if self._proc is not None and self._proc.poll() is not None:
            self._reset()  # it died while idle: nothing of ours was under way, so start another
        if self._sock is None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self._proc = subprocess.Popen(
                    # by file, isolated (-I) and without site (-S): it needs only the standard
                    # library, so it starts wherever the gateway was imported from, and sooner
                    [sys.executable, "-I", "-S", appender_child.__file__, str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True)
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            ours.setblocking(False)
            self._sock = ours

    async def append(self, fd: int, path: str, chunk: bytes, check_path: bool) -> None:
        """Append `chunk` to `fd` and fsync it. Replaced when `check_path` and `path` no longer names
        the file (nothing written); OSError when it could not be made durable (the chunk cut back off)."""
        async with self._lock:
            self.start()
            loop = asyncio.get_running_loop()
            name = os.fsencode(path)
            start = NOTHING  # until the helper says where the chunk begins, nothing of it is written
            try:
                socket.send_fds(self._sock, [HEADER.pack(check_path, len(name), len(chunk))], [fd])
                await loop.sock_sendall(self._sock, name + chunk)
                start = START.unpack(await self._read(START.size))[0]
                answer = (await self._read(1))[0]
            except (OSError, EOFError) as exc:
                self._reset()
                if start != NOTHING:  # it died half-way: cut back what it may have written
                    await loop.run_in_executor(None, self._cut, fd, start)
                why = "exited" if isinstance(exc, EOFError) else f"failed ({exc.strerror or exc})"
                raise OSError(errno.EIO, f"the audit log's helper process {why}") from None
            except BaseException:
                # Cancelled mid-call (the writer's close ran out of time): its answer would be taken for
                # the next call's. A chunk the helper was writing may end in a torn line, which the next
                # start moves aside and records.
                self._reset()
                raise
            if answer == REPLACED:
                raise Replaced()
            if answer:
                raise OSError(answer, os.strerror(answer))

    async def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            part = await asyncio.get_running_loop().sock_recv(self._sock, n - len(data))
            if not part:
                raise EOFError()
            data += part
        return data

    @staticmethod
    def _cut(fd: int, start: int) -> None:
        """The helper died during an append: what it may have written is cut back, to be written again."""
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass

    def close(self) -> None:
        self._reset()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _reset(self) -> None:
        """Close the socket (the helper ends when it sees it closed) and end the helper, without waiting."""
        sock, proc, self._sock, self._proc = self._sock, self._proc, None, None
        if sock is not None:
            sock.close()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()  # no call is under way, or its answer is given up on
            self._ended.append(proc)
        self._reap()

    def _reap(self) -> None:
        self._ended = [proc for proc in self._ended if proc.poll() is None]
