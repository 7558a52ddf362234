"""The upstream client: a keep-alive pool to one server, bodies streamed both ways.

Responses are passed on as the upstream sent them (no decompression).
Connection failures become UpstreamUnavailable (502), an upstream slower than
upstream.timeout_s UpstreamTimeout (504). The order -> solicitor look-ups
that order operations need are cached briefly here, absent orders included.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import AsyncIterator

from aiohttp import ClientPayloadError
from cachetools import TTLCache

from gateway.shell.pool import ConnectionBroken, Pool, Response


_UNKNOWN = object()


class UpstreamUnavailable(Exception):
    """The upstream could not be reached or answered nonsense (HTTP 502)."""


class UpstreamTimeout(Exception):
    """The upstream was slower than upstream.timeout_s (HTTP 504)."""


class Upstream:
    def __init__(self, base_url: str, timeout_s: float, solicitor_ttl_s: float = 5.0,
                 ssl_context: ssl.SSLContext | None = None, keepalive_s: float = 10.0, max_connections: int = 100):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.pool = Pool(self.base_url, ssl_context, keepalive_s=keepalive_s, max_connections=max_connections)
        # order id -> solicitor (None: no such order); bounded, so a flood of ids keeps memory flat
        self.solicitors: TTLCache = TTLCache(maxsize=10000, ttl=solicitor_ttl_s)

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
            raise UpstreamTimeout("the upstream did not answer in time") from None
        except (ConnectionBroken, OSError) as exc:
            raise UpstreamUnavailable(f"the upstream cannot be reached ({type(exc).__name__})") from None

    async def order_solicitor(self, order_id: str, headers: dict[str, str]) -> dict | None:
        """The solicitor {source, identifier} of an order as the upstream stores it; None if no such order."""
        cached = self.solicitors.get(order_id, _UNKNOWN)
        if cached is not _UNKNOWN:
            return cached
        resp = await self.send("GET", f"/orders/{order_id}", {**headers, "accept": "application/json"})
        async with resp:
            try:
                if resp.status == 404:
                    await resp.read()
                    # Cached like a found order, so that "not yours" and "no such order" take the same time.
                    self.solicitors[order_id] = None
                    return None
                if resp.status != 200:
                    raise UpstreamUnavailable(f"the upstream answered {resp.status} to an order look-up")
                order = json.loads(await resp.read())
            except TimeoutError:
                raise UpstreamTimeout("the upstream did not answer in time") from None
            except (ClientPayloadError, ValueError):
                raise UpstreamUnavailable("the upstream's order is not readable JSON") from None
        solicitor = order.get("solicitor") if isinstance(order, dict) else None
        if not isinstance(solicitor, dict):
            raise UpstreamUnavailable("the upstream's order has no solicitor")
        found = {"source": solicitor.get("source"), "identifier": solicitor.get("identifier")}
        self.solicitors[order_id] = found
        return found

    def forget_order(self, order_id: str) -> None:
        """An order was created or deleted: its cached look-up (found or absent) no longer holds."""
        self.solicitors.pop(order_id, None)

    async def ready(self) -> str | None:
        """None when the upstream answers over HTTP, else why not."""
        try:
            async with asyncio.timeout(3):
                resp = await self.pool.request("GET", "/", {"accept": "*/*"})
                async with resp:
                    await resp.read()
            return None
        except (TimeoutError, ConnectionBroken, ClientPayloadError, OSError) as exc:
            return f"upstream unreachable ({type(exc).__name__})"
