"""The audit log's appender process: seal records into lines (or take a chunk as it is), append them
to a descriptor it is passed, fsync, answer.

Started by appender.Appender (`python -I -S .../appender_child.py SOCKET_FD PIPE_FD`), never by hand.
Each message on the socket: a header (whether to check the path still names the file, whether
the payload is records to seal or a chunk to write as it is, the lengths of the path, the
chain's key and the payload) with the descriptor attached (SCM_RIGHTS), then the path, the key
and the payload. Records come as marshal data, (the chain's head, [record, ...]), and are
sealed here with gateway/core/audit.py's own `seal`, loaded by path: the canonical JSON and
the HMAC of every line are this process's work, on another core than the event loop's.
Before writing a byte, the file's size (where the chunk begins) goes on the pipe, so that the
gateway can cut the chunk back should this process die half-way. The answer on the socket is
ANSWER bytes: a status (0 when the chunk is on disk, REPLACED when the path no longer names
the file: nothing written, else the errno of what failed, the chunk having been cut back off
the file), then the hash of the last line written (the chain's new head; zeros otherwise).
It imports nothing of the gateway but that pure module, so it starts fast; it exits when its
socket closes.
"""

from __future__ import annotations

import errno
import importlib.util
import marshal
import os
import signal
import socket
import stat
import struct
import sys

HEADER = struct.Struct("!BBIII")  # check the path?, records (1) or a chunk (0), path, key and payload lengths
START = struct.Struct("!Q")       # the file's size before the chunk
HEAD = 64                         # the hash that ends the answer: hex SHA-256 or HMAC-SHA256
ANSWER = 1 + HEAD
REPLACED = 255
_NO_HEAD = b"0" * HEAD


def _audit_core():
    """gateway/core/audit.py, loaded by path (this process runs isolated, without the package)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "core", "audit.py")
    spec = importlib.util.spec_from_file_location("gateway_audit_core", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def seal_all(seal, prev: str, records: list, key: bytes | None) -> tuple[bytes, str]:
    """The records sealed into lines chained from `prev`: (the chunk, the new head). A record that cannot
    be sealed is replaced by one that says so, as the writer always did: one odd record never stops the log."""
    lines = []
    for record in records:
        try:
            line, prev = seal(record, prev, key)
        except (TypeError, ValueError, AttributeError) as exc:
            request_id = record.get("request_id") if isinstance(record, dict) else None
            line, prev = seal({"request_id": request_id if isinstance(request_id, str) else None,
                               "error": f"could not be sealed ({exc})"[:200]}, prev, key)
        lines.append(line)
    return b"".join(lines), prev


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


def serve(sock: socket.socket, where: int, seal) -> None:
    while True:
        try:
            head, fds, _, _ = socket.recv_fds(sock, HEADER.size, 4)
            if not head:
                return
            rest = _read_exactly(sock, HEADER.size - len(head))
            if rest is None:
                return
            check, records, path_len, key_len, payload_len = HEADER.unpack(head + rest)
            body = _read_exactly(sock, path_len + key_len + payload_len)
            if body is None:
                return
        except OSError:
            return
        for extra in fds[1:]:
            os.close(extra)
        path, key, payload = body[:path_len], body[path_len:path_len + key_len], body[path_len + key_len:]
        chain = _NO_HEAD
        try:
            if not fds:
                answer = errno.EBADF
            else:
                try:
                    answer = 0
                    if records:
                        try:
                            prev, batch = marshal.loads(payload)
                            payload, new_head = seal_all(seal, prev, batch, key or None)
                            chain = new_head.encode("ascii")
                        except (ValueError, TypeError, EOFError):
                            answer = errno.EINVAL
                    if answer == 0:
                        answer = append(where, fds[0], bool(check), path, payload)
                        if answer:
                            chain = _NO_HEAD
                finally:
                    os.close(fds[0])
            sock.sendall(bytes([answer]) + chain)
        except OSError:  # the gateway is gone
            return


if __name__ == "__main__":
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # ends with its socket, after the gateway's last lines
    serve(socket.socket(fileno=int(sys.argv[1])), int(sys.argv[2]), _audit_core().seal)
