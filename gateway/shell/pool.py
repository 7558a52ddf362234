"""A small keep-alive HTTP/1.1 connection pool to one upstream, on aiohttp's own parser.

aiohttp's ClientSession is most of a proxy's cost per request (cookie jar,
redirects, tracing, URL building, a connector with per-host limits: none of
which a gateway calling one fixed upstream needs). This pool only writes a
request head the gateway composed from vetted parts and reads the answer with
aiohttp's HttpResponseParser (llhttp, the same parser ClientSession uses), so
response framing, chunked encoding and header limits are never parsed by
hand. One request at a time a connection; no pipelining.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import AsyncIterator
from urllib.parse import urlsplit

from aiohttp import ClientPayloadError
from gateway.shell.compat import FlowControlledProtocol, ResponseParser, writable
from gateway.shell.upstream_tls import connect_failure

READ_LIMIT = 2 ** 16
MAX_IDLE = 256


class ConnectionBroken(ConnectionError):
    """The connection closed or the answer could not be parsed."""


class _Connection(FlowControlledProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__(loop)
        self.parser = ResponseParser(
            self, loop, READ_LIMIT, timer=None, payload_exception=ClientPayloadError,
            response_with_body=True, read_until_eof=False, auto_decompress=False,
        )
        self._parser = self.parser  # BaseProtocol pauses and resumes it for flow control
        self.answer: asyncio.Future | None = None
        self.payload = None
        self.dead = False
        self.counted = True   # holds one of the pool's slots until discarded

    def data_received(self, data: bytes) -> None:
        try:
            messages, _, _ = self.parser.feed_data(data)
        except Exception as exc:  # a malformed answer: this connection is done
            self._fail(ConnectionBroken(f"the upstream's answer is malformed ({type(exc).__name__})"))
            if self.transport is not None:
                self.transport.close()
            return
        for message, payload in messages:
            if 100 <= message.code < 200 and message.code != 101:
                continue  # interim answers (100 Continue, 103 Early Hints): the final one follows
            if self.answer is not None and not self.answer.done():
                self.payload = payload
                self.answer.set_result((message, payload))
            else:  # an answer nobody asked for
                self.dead = True
                if self.transport is not None:
                    self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.dead = True
        try:
            self.parser.feed_eof()
        except Exception:
            pass
        # why, when there is a why: a TLS 1.3 upstream refuses a missing client certificate only after
        # the handshake, with an alert that arrives here
        self._fail(ConnectionBroken("the upstream closed the connection"
                                    + (f" ({connect_failure(exc)})" if exc is not None else "")))
        if self.payload is not None and not self.payload.is_eof():
            self.payload.set_exception(ClientPayloadError("the upstream closed the connection mid-answer"))
        super().connection_lost(exc)

    def time_out(self) -> None:
        """The answer's head did not come in time: this connection is done."""
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(TimeoutError())
            self.dead = True
            if self.transport is not None:
                self.transport.close()

    def _fail(self, exc: Exception) -> None:
        self.dead = True
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(exc)


class Response:
    """An upstream answer: status, headers and a streamed body; release() gives the connection back."""

    def __init__(self, pool: "Pool", conn: _Connection, message, payload, read_timeout: float | None):
        self._pool, self._conn, self._timeout = pool, conn, read_timeout
        self.status: int = message.code
        self.reason: str = message.reason
        self.raw_headers = message.raw_headers
        self.headers = message.headers
        self.content = payload
        self._keep = not message.should_close
        length = message.headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None

    async def read(self) -> bytes:
        if self.content.is_eof():  # the whole body came with the head (small answers): nothing to wait for
            return await self.content.read()
        async with asyncio.timeout(self._timeout):
            return await self.content.read()

    async def iter_chunks(self, size: int) -> AsyncIterator[bytes]:
        """The body in chunks of up to `size` bytes; each read bounded by the read timeout."""
        while True:
            async with asyncio.timeout(self._timeout):
                chunk = await self.content.read(size)
            if not chunk:
                return
            yield chunk

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._release(conn, self._keep and self.content.is_eof())

    async def __aenter__(self) -> "Response":
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()


class Pool:
    """Keep-alive connections to one upstream: at most `max_connections` open, none reused after `keepalive_s` idle.

    A server closes idle keep-alive connections after a timeout of its own (nginx: 75 s,
    many: 5 to 15 s). If it does so just as a request is sent on that connection, a POST
    cannot be retried safely and becomes a 502; keeping `keepalive_s` below the upstream's
    timeout means an idle connection is dropped here before the upstream drops it.
    Connections the upstream has already closed are never reused.
    """

    def __init__(self, base_url: str, ssl_context: ssl.SSLContext | None = None, keepalive_s: float = 10.0,
                 max_connections: int = 100, clock=time.monotonic, server_name: str | None = None):
        parts = urlsplit(base_url)
        self.scheme = parts.scheme
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        default_port = (self.scheme == "https" and self.port == 443) or (self.scheme == "http" and self.port == 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.ssl = (ssl_context or ssl.create_default_context()) if self.scheme == "https" else None
        self.server_name = server_name if self.ssl is not None else None   # verified and sent as SNI
        self.keepalive_s, self.max_connections, self.clock = keepalive_s, max_connections, clock
        self.open = 0                                   # connections open or being opened
        self._idle: collections.deque[tuple[float, _Connection]] = collections.deque()  # (idle since, conn)
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Connection(loop), self.host, self.port, ssl=self.ssl,
                                               server_hostname=self.server_name)
        return conn

    def _usable(self, since: float, conn: _Connection, now: float) -> bool:
        return (not conn.dead and conn.transport is not None and not conn.transport.is_closing()
                and now - since < self.keepalive_s)

    def _take_idle(self) -> _Connection | None:
        now = self.clock()
        while self._idle:
            since, conn = self._idle.pop()  # the most recently used first
            if self._usable(since, conn, now):
                return conn
            self._discard(conn)
        return None

    def _sweep(self) -> None:
        """Close idle connections past keepalive_s or closed by the upstream (the oldest are on the left)."""
        now = self.clock()
        while self._idle and not self._usable(*self._idle[0], now):
            self._discard(self._idle.popleft()[1])

    async def _slot(self) -> _Connection | None:
        """An idle connection, or None with a slot reserved for a new one; waits while all are in use."""
        while True:
            conn = self._take_idle()
            if conn is not None:
                return conn
            if self.open < self.max_connections:
                self.open += 1
                return None
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # the turn given to this caller goes to the next one
                raise

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _discard(self, conn: _Connection | None) -> None:
        """A connection (or a reserved slot, None) is done with: close it and free its slot."""
        if conn is not None:
            if conn.counted is False:
                return
            conn.counted = False
            if conn.transport is not None:
                conn.transport.close()
        self.open -= 1
        self._wake()

    def _release(self, conn: _Connection, keep: bool) -> None:
        if keep and not conn.dead and len(self._idle) < MAX_IDLE:
            conn.answer = conn.payload = None
            self._idle.append((self.clock(), conn))
            self._sweep()
            self._wake()
        else:
            self._discard(conn)

    def _head(self, method: str, path: str, headers: dict[str, str]) -> bytes:
        lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"Host: {self.host_header}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        for line in lines:
            if "\r" in line or "\n" in line or "\0" in line:
                raise ValueError("a request line or header holds a control character")
        # aiohttp decoded the client's header bytes as UTF-8 with surrogateescape: this gives them back as sent
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")

    async def request(self, method: str, path: str, headers: dict[str, str],
                      body: AsyncIterator[bytes] | None = None, read_timeout: float | None = None) -> Response:
        """Send one request; a stale idle connection is retried once for GET (nothing was answered).

        `read_timeout` bounds, together, the wait for a free connection, connecting and the wait for
        the answer's head once the body is sent (one budget, not one each), and then each read of
        the answer's body; sending the body is bounded by the caller.
        """
        head = self._head(method, path, headers)
        loop = asyncio.get_running_loop()
        deadline = None if read_timeout is None else loop.time() + read_timeout
        while True:
            conn = self._take_idle()  # the common case: a free connection, nothing to wait for
            reused = conn is not None
            if conn is None:
                async with asyncio.timeout_at(deadline):
                    conn = await self._slot()
                    reused = conn is not None
            if conn is None:
                async with asyncio.timeout_at(deadline):
                    try:
                        conn = await self._connect()
                    except BaseException:
                        self._discard(None)
                        raise
            try:
                return await self._exchange(conn, head, body, deadline, read_timeout)
            except ConnectionBroken:
                self._discard(conn)
                if not (reused and method == "GET"):
                    raise
            except BaseException:
                self._discard(conn)
                raise

    async def _exchange(self, conn: _Connection, head: bytes, body: AsyncIterator[bytes] | None,
                        deadline: float | None, read_timeout: float | None) -> Response:
        loop = asyncio.get_running_loop()
        conn.answer = loop.create_future()
        sending = loop.time()
        conn.transport.write(head)
        if body is not None:
            async for chunk in body:
                if conn.dead:
                    break
                conn.transport.write(chunk)
                await writable(conn)
        if deadline is not None:
            deadline += loop.time() - sending  # the time the body took to send is the caller's, not the upstream's
        timer = None if deadline is None else loop.call_at(deadline, conn.time_out)  # cheaper than a Timeout
        try:
            message, payload = await conn.answer
        finally:
            if timer is not None:
                timer.cancel()
        return Response(self, conn, message, payload, read_timeout)

    def close(self) -> None:
        while self._idle:
            self._discard(self._idle.pop()[1])
