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
from gateway.shell.appender_child import HEADER, REPLACED, START


class Replaced(Exception):
    """The path no longer names the open file: nothing was written."""


class Appender:
    """append(fd, chunk) awaited on the event loop, done by the helper process; one call at a time.

    The helper answers each call with one byte on the socket, which the loop watches for as long
    as the helper runs (one reader, not one a call). Where a chunk begins goes the other way, on a
    pipe the loop does not watch: the helper writes it there before the chunk, and it is read
    only when the helper died half-way (to cut the chunk back), or drained after the answer. So
    an append costs the loop one wake-up, not two.
    """

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._where: int | None = None     # the pipe's end the helper says where chunks begin on
        self._proc: subprocess.Popen | None = None
        self._loop: asyncio.AbstractEventLoop | None = None   # where the socket is watched
        self._answer = bytearray()
        self._waiter: asyncio.Future | None = None
        self._lock = asyncio.Lock()
        self._ended: list[subprocess.Popen] = []   # helpers told to end, reaped once they have

    def start(self) -> None:
        """Start the helper now rather than at the first append (a start costs a Python start-up)."""
        self._reap()
        watched = self._loop is asyncio.get_running_loop()  # not so once its end of file was seen
        if self._proc is not None and (not watched or self._proc.poll() is not None):
            self._reset()  # it died while idle: nothing of ours was under way, so start another
        if self._sock is None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            where, said = os.pipe()
            try:
                self._proc = subprocess.Popen(
                    # by file, isolated (-I) and without site (-S): it needs only the standard
                    # library, so it starts wherever the gateway was imported from, and sooner
                    [sys.executable, "-I", "-S", appender_child.__file__, str(theirs.fileno()), str(said)],
                    pass_fds=(theirs.fileno(), said), stdin=subprocess.DEVNULL, start_new_session=True)
            except BaseException:
                ours.close()
                os.close(where)
                raise
            finally:
                theirs.close()
                os.close(said)
            ours.setblocking(False)
            os.set_blocking(where, False)
            self._sock, self._where, self._answer = ours, where, bytearray()
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(ours.fileno(), self._readable)

    async def append(self, fd: int, path: str, chunk: bytes, check_path: bool) -> None:
        """Append `chunk` to `fd` and fsync it. Replaced when `check_path` and `path` no longer names
        the file (nothing written); OSError when it could not be made durable (the chunk cut back off)."""
        async with self._lock:
            if self._answer:
                self._reset()  # an answer no call asked for: never take it for the next call's
            self.start()
            loop = asyncio.get_running_loop()
            name = os.fsencode(path)
            self._waiter = loop.create_future()
            try:
                # header, path and chunk in one call where the socket takes them all (it is empty here)
                data = HEADER.pack(check_path, len(name), len(chunk)) + name + chunk
                sent = socket.send_fds(self._sock, [data], [fd])
                if sent < len(data):
                    await loop.sock_sendall(self._sock, memoryview(data)[sent:])
                answer = await self._outcome()
            except (OSError, EOFError) as exc:
                start = self._said()
                self._reset()
                if start is not None:  # it died half-way: cut back what it may have written
                    await loop.run_in_executor(None, self._cut, fd, start)
                why = "exited" if isinstance(exc, EOFError) else f"failed ({exc.strerror or exc})"
                raise OSError(errno.EIO, f"the audit log's helper process {why}") from None
            except BaseException:
                # Cancelled mid-call (the writer's close ran out of time): its answer would be taken for
                # the next call's. A chunk the helper was writing may end in a torn line, which the next
                # start moves aside and records.
                self._reset()
                raise
            finally:
                waiter, self._waiter = self._waiter, None
                if waiter.done() and not waiter.cancelled():
                    waiter.exception()  # seen: the helper's end, when a failed send is what is raised
            self._said()  # drained: where this chunk began is of no more use
            if answer == REPLACED:
                raise Replaced()
            if answer:
                raise OSError(answer, os.strerror(answer))

    async def _outcome(self) -> int:
        """The helper's answer byte to the call under way; EOFError when it exited first."""
        if not self._answer:
            await self._waiter
        answer = self._answer[0]
        del self._answer[:1]
        return answer

    def _readable(self) -> None:
        try:
            data = self._sock.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self._answer += data
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)
            return
        self._unwatch()  # the helper is gone (an end of file stays readable: stop watching it)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(EOFError())

    def _said(self) -> int | None:
        """Where the helper said the chunk under way begins, None when it said nothing (the pipe drained)."""
        try:
            said = os.read(self._where, 4096) if self._where is not None else b""
        except (BlockingIOError, InterruptedError):
            said = b""
        return START.unpack_from(said, len(said) - START.size)[0] if len(said) >= START.size else None

    def _unwatch(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and self._sock is not None and not loop.is_closed():
            loop.remove_reader(self._sock.fileno())

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
        self._unwatch()
        sock, where, proc, self._sock, self._where, self._proc = self._sock, self._where, self._proc, None, None, None
        self._answer = bytearray()
        if sock is not None:
            sock.close()
        if where is not None:
            os.close(where)
        if proc is not None:
            if proc.poll() is None:
                proc.kill()  # no call is under way, or its answer is given up on
            self._ended.append(proc)
        self._reap()

    def _reap(self) -> None:
        self._ended = [proc for proc in self._ended if proc.poll() is None]
