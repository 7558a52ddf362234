"""The audit log's appender process: append a chunk to a descriptor it is passed, fsync, answer.

Started by appender.Appender (`python -I -S .../appender_child.py SOCKET_FD PIPE_FD`), never by hand.
Each message on the socket: a header (whether to check the path still names the file, the
path's and the chunk's lengths) with the descriptor attached (SCM_RIGHTS), then the path and
the chunk. Before writing a byte of the chunk, the file's size (where the chunk begins) goes
on the pipe, so that the gateway can cut the chunk back should this process die half-way.
The answer on the socket is one byte: 0 when the chunk is on disk, REPLACED when the path no
longer names the file (nothing written), else the errno of what failed, the chunk having
been cut back off the file. It imports nothing of the gateway, so it starts fast; it exits
when its socket closes.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import struct
import sys

HEADER = struct.Struct("!BII")    # check the path?, path length, chunk length
START = struct.Struct("!Q")       # the file's size before the chunk
REPLACED = 255


def replaced(fd: int, path) -> bool:
    """Whether the path no longer names the open file (removed, renamed, replaced)."""
    mine = os.fstat(fd)
    if not stat.S_ISREG(mine.st_mode):
        return False  # a device such as /dev/full: nothing to compare
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return True
    return (on_disk.st_ino, on_disk.st_dev) != (mine.st_ino, mine.st_dev)


def append(where: int, fd: int, check: bool, path: bytes, chunk: bytes) -> int:
    """Append and fsync, saying first on `where` where the chunk begins; the answer byte."""
    try:
        if check and replaced(fd, path):
            return REPLACED
        start = os.lseek(fd, 0, os.SEEK_END)
    except OSError as exc:  # the path or the file could not be looked at
        return _errno(exc)
    os.write(where, START.pack(start))  # fewer bytes than PIPE_BUF: all at once
    try:
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        return 0
    except OSError as exc:
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass
        return _errno(exc)


def _errno(exc: OSError) -> int:
    return exc.errno if exc.errno and 0 < exc.errno < REPLACED else errno.EIO


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    parts, left = [], n
    while left:
        part = sock.recv(min(left, 1 << 20))
        if not part:
            return None
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def serve(sock: socket.socket, where: int) -> None:
    while True:
        try:
            head, fds, _, _ = socket.recv_fds(sock, HEADER.size, 4)
            if not head:
                return
            rest = _read_exactly(sock, HEADER.size - len(head))
            if rest is None:
                return
            check, path_len, chunk_len = HEADER.unpack(head + rest)
            body = _read_exactly(sock, path_len + chunk_len)
            if body is None:
                return
        except OSError:
            return
        for extra in fds[1:]:
            os.close(extra)
        try:
            if not fds:
                answer = errno.EBADF
            else:
                try:
                    answer = append(where, fds[0], bool(check), body[:path_len], body[path_len:])
                finally:
                    os.close(fds[0])
            sock.sendall(bytes([answer]))
        except OSError:  # the gateway is gone
            return


if __name__ == "__main__":
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # ends with its socket, after the gateway's last lines
    serve(socket.socket(fileno=int(sys.argv[1])), int(sys.argv[2]))
