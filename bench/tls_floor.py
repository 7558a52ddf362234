"""The floor of TLS termination on asyncio: the gateway's own TLS context, a fixed answer, nothing else.

What a Python asyncio server pays a connection and a request for TLS alone (Python's sslproto
over the same OpenSSL as the gateway), so that a gateway/nginx ratio can be read against
floor/nginx: the part of the gap that floor/nginx already shows is the cost of terminating TLS
on asyncio, not of anything the gateway does. The SSL context is built exactly as the gateway
builds it (gateway.shell.settings.load_config, gateway.shell.tls.server_context: same
certificate, client CA, CRL, verify flags), from a gateway config.yaml; the server is
loop.create_server(Protocol, ssl=ctx) answering every request with `HTTP/1.1 200 OK`,
text/plain, `PENDING`: no HTTP library, no proxying, no identity, policy, audit or metrics.
Requests are split on a blank line; an HTTP/1.0 request or a `Connection: close` header closes
the connection after the answer, otherwise it is kept alive. bench/targets.py starts it as the
`floor` target; bench/tls_tickets.py with --tickets.

    python bench/tls_floor.py PORT CONFIG [--tickets N]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the gateway package, not bench/gateway.py
from gateway.shell.settings import load_config  # noqa: E402
from gateway.shell.tls import server_context  # noqa: E402

BODY = b"PENDING"
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(BODY)
KEEP = HEAD + b"Connection: keep-alive\r\n\r\n" + BODY
CLOSE = HEAD + b"Connection: close\r\n\r\n" + BODY


def closes(head: bytes) -> bool:
    """An HTTP/1.0 request line, or a `Connection: close` header."""
    line, _, rest = head.partition(b"\r\n")
    if line.rstrip().endswith(b"HTTP/1.0"):
        return True
    for header in rest.split(b"\r\n"):
        name, _, value = header.partition(b":")
        if name.strip().lower() == b"connection" and value.strip().lower() == b"close":
            return True
    return False


class Answer(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport, self.buffer = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None and b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            if closes(head):
                self.transport.write(CLOSE)
                self.transport.close()  # after the answer is written (and TLS close_notify)
                self.transport = None
            else:
                self.transport.write(KEEP)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None


async def serve(port: int, config: Path, tickets: int | None) -> None:
    ctx = server_context(load_config(config))
    if tickets is not None:
        ctx.num_tickets = tickets  # TLS 1.3 session tickets sent after a handshake (Python's default: 2)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Answer, "127.0.0.1", port, ssl=ctx, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("config", type=Path)
    parser.add_argument("--tickets", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.port, args.config, args.tickets))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
