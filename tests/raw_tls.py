"""A raw HTTP/1.1 client over a real TLS socket, for requests no HTTP library will send.

Blocking on purpose: Python's `ssl` can keep a TLS session and offer it again
only on blocking sockets, and tests run it in a thread next to the in-process
gateway (`await asyncio.to_thread(...)`).
"""

from __future__ import annotations

import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

TIMEOUT_S = 5.0


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> dict:
        return json.loads(self.body)


class RawClient:
    """One TLS connection; send bytes, read whole answers, see whether the server closed it."""

    def __init__(self, port: int, ca: Path, cert: tuple[Path, Path] | None,
                 session: ssl.SSLSession | None = None, context: ssl.SSLContext | None = None,
                 tls13: bool = True):
        if context is None:
            context = ssl.create_default_context(cafile=str(ca))
            if cert is not None:
                context.load_cert_chain(*map(str, cert))
            if tls13:
                context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.context = context
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        self.tls = context.wrap_socket(sock, server_hostname="localhost", session=session)
        self._buf = b""

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.tls.close()
        except OSError:
            pass

    @property
    def session(self) -> ssl.SSLSession | None:
        return self.tls.session

    @property
    def resumed(self) -> bool:
        return self.tls.session_reused

    def send(self, data: bytes) -> None:
        self.tls.sendall(data)

    def _fill(self) -> bool:
        try:
            chunk = self.tls.recv(65536)
        except (ConnectionError, ssl.SSLError):
            chunk = b""
        self._buf += chunk
        return bool(chunk)

    def response(self, head_only: bool = False) -> RawResponse | None:
        """The next answer (interim 1xx answers included), or None if the server closed first."""
        while b"\r\n\r\n" not in self._buf:
            if not self._fill():
                return None
        head, self._buf = self._buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
        resp = RawResponse(status, headers, b"")  # type: ignore[arg-type]
        if head_only or status < 200:
            return resp
        length = int(resp.header("Content-Length") or 0)
        while len(self._buf) < length:
            if not self._fill():
                break
        resp.body, self._buf = self._buf[:length], self._buf[length:]
        return resp

    def request(self, data: bytes) -> RawResponse | None:
        self.send(data)
        return self.response(head_only=data.startswith(b"HEAD "))

    def closed_by_server(self) -> bool:
        """True once the server has closed the connection (waits at most TIMEOUT_S for it)."""
        if self._buf:
            return False
        return not self._fill()

    def read_ticket(self) -> ssl.SSLSession:
        """TLS 1.3 sends its session tickets after the handshake: read an answer first, then take the session."""
        session = self.tls.session
        assert session is not None and session.has_ticket, "the server sent no session ticket"
        return session


def get(path: str, host: str = "localhost", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()
