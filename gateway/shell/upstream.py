"""The upstream client: a keep-alive pool to one server, bodies streamed both ways.

Responses are passed on as the upstream sent them (no decompression).
Connection failures are a Refusal 502 (upstream_unavailable), an upstream
slower than upstream.timeout_s a Refusal 504 (upstream_timeout), raised here
so that no caller maps them again.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import AsyncIterator

from aiohttp import ClientPayloadError

from gateway.core.errors import Reason, Refusal
from gateway.shell.pool import ConnectionBroken, Pool, Response
from gateway.shell.upstream_tls import connect_failure


def unavailable(detail: str, cause: str | None = None) -> Refusal:
    """The upstream could not be reached or answered nonsense; `cause` says why, for the log only."""
    return Refusal(502, Reason.UPSTREAM_UNAVAILABLE, detail, cause=cause)


def too_slow(detail: str = "the upstream did not answer in time") -> Refusal:
    """The upstream was slower than upstream.timeout_s."""
    return Refusal(504, Reason.UPSTREAM_TIMEOUT, detail)


class Upstream:
    def __init__(self, base_url: str, timeout_s: float,
                 ssl_context: ssl.SSLContext | None = None, keepalive_s: float = 10.0, max_connections: int = 100,
                 server_name: str | None = None, ready_path: str | None = None):
        self.base_url = base_url.rstrip("/")
        # The embedded reference API has a readiness answer of its own (its user directory): asked here.
        self.ready_path = ready_path
        self.timeout_s = timeout_s
        self.pool = Pool(self.base_url, ssl_context, keepalive_s=keepalive_s, max_connections=max_connections,
                         server_name=server_name)

    async def close(self) -> None:
        self.pool.close()

    async def send(
        self, method: str, path: str, headers: dict[str, str],
        body: AsyncIterator[bytes] | None = None, length: int | None = None,
    ) -> Response:
        """Send a request and wait for the answer's head; the caller reads and releases the body."""
        if body is not None and length is not None:
            headers = {**headers, "content-length": str(length)}
        elif method in ("POST", "PUT", "PATCH"):
            headers = {**headers, "content-length": "0"}
        try:
            return await self.pool.request(method, path, headers, body, read_timeout=self.timeout_s)
        except TimeoutError:
            raise too_slow() from None
        except (ConnectionBroken, OSError) as exc:
            raise unavailable(f"the upstream cannot be reached ({type(exc).__name__})", connect_failure(exc)) from None

    async def ready(self) -> str | None:
        """None when the upstream answers over HTTP (with ready_path: answers it 2xx), else why not."""
        try:
            async with asyncio.timeout(3):
                resp = await self.pool.request("GET", self.ready_path or "/", {"accept": "*/*"})
                async with resp:
                    body = await resp.read()
            if self.ready_path and not 200 <= resp.status < 300:
                return f"upstream not ready ({resp.status}: {body[:300].decode('utf-8', 'replace')})"
            return None
        except (TimeoutError, ConnectionBroken, ClientPayloadError, OSError) as exc:
            return f"upstream unreachable ({connect_failure(exc)})"
