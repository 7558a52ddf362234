"""fsync in a helper process, so that durable audit lines cost the event loop no thread.

A thread calling os.fsync must take the GIL back after every system call it makes; while
the event loop is busy, each time is a handoff of the GIL between the two threads (a
loaded gateway made about three futex calls a request for it, and spent some 15-20 % more
CPU a request than with no thread at all). The helper is a small process of its own, with
its own GIL: the gateway passes it the log's descriptor over a Unix socket (SCM_RIGHTS),
the helper fsyncs it and answers one byte, 0 or the errno. The event loop waits for that
byte like for any socket read, so a slow or hung disk holds up the audit writer only
(answers waiting on it get their 503 in time), never the loop.

The helper exits when its socket closes (the gateway stopped, even by SIGKILL), ignores
SIGINT and SIGTERM (a Ctrl-C reaches the whole process group, and the gateway still
fsyncs its last lines while it drains), and is started again if it died.

    python -m gateway.shell.fsyncer FD     (the helper; started by Fsyncer, not by hand)
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import subprocess
import sys

EXIT_WAIT_S = 0.2


class Fsyncer:
    """fsync(fd) awaited on the event loop, done by the helper process; one call at a time."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._lock = asyncio.Lock()

    def start(self) -> None:
        """Start the helper now rather than at the first fsync (a start costs a Python start-up)."""
        if self._sock is None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "gateway.shell.fsyncer", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            ours.setblocking(False)
            self._sock = ours

    async def fsync(self, fd: int) -> None:
        """os.fsync(fd), by the helper; OSError with the helper's errno, or EIO when the helper failed."""
        async with self._lock:
            try:
                self.start()
                socket.send_fds(self._sock, [b"s"], [fd])  # one byte: always fits the socket's buffer
                answer = await asyncio.get_running_loop().sock_recv(self._sock, 1)
            except OSError as exc:
                self._reset()
                raise OSError(errno.EIO, f"the fsync helper failed ({exc.strerror or exc})") from None
            except BaseException:
                self._reset()  # cancelled mid-call: its answer would be taken for the next call's
                raise
            if not answer:
                self._reset()
                raise OSError(errno.EIO, "the fsync helper exited")
            if answer != b"\0":
                raise OSError(answer[0], os.strerror(answer[0]))

    def close(self) -> None:
        self._reset()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _reset(self) -> None:
        """Close the socket and end the helper (no call is under way, or its answer is given up on)."""
        sock, proc, self._sock, self._proc = self._sock, self._proc, None, None
        if sock is not None:
            sock.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            try:
                proc.wait(EXIT_WAIT_S)
            except subprocess.TimeoutExpired:  # in an fsync that does not return: reaped when it does
                _unreaped.append(proc)


_unreaped: list[subprocess.Popen] = []


def _serve(fd: int) -> None:
    """The helper: fsync each descriptor received, answer 0 or the errno; exit when the socket closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, 1, 4)
        except OSError:
            return
        if not message:
            return
        for extra in fds[1:]:
            os.close(extra)
        if not fds:
            reply = errno.EBADF
        else:
            try:
                os.fsync(fds[0])
                reply = 0
            except OSError as exc:
                reply = exc.errno if exc.errno and 0 < exc.errno < 256 else errno.EIO
            finally:
                os.close(fds[0])
        try:
            sock.sendall(bytes([reply]))
        except OSError:
            return


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
