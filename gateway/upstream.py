"""The upstream client: one pooled aiohttp ClientSession, bodies streamed both ways.

Responses are not decompressed (`auto_decompress=False`): bytes pass through
as the upstream sent them. Connection failures become UpstreamUnavailable
(502), timeouts UpstreamTimeout (504).
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

import aiohttp

from gateway.cache import TTLCache


class UpstreamUnavailable(Exception):
    """The upstream could not be reached or answered nonsense (HTTP 502)."""


class UpstreamTimeout(Exception):
    """The upstream was slower than upstream.timeout_s (HTTP 504)."""


class Upstream:
    def __init__(self, base_url: str, timeout_s: float, solicitor_ttl_s: float = 5.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        self.session: aiohttp.ClientSession | None = None
        self.solicitors: TTLCache[dict | None] = TTLCache(solicitor_ttl_s, 10000)

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30, enable_cleanup_closed=True),
            auto_decompress=False,
            timeout=self.timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def send(
        self, method: str, path: str, headers: dict[str, str],
        body: AsyncIterator[bytes] | None = None, length: int | None = None,
    ) -> aiohttp.ClientResponse:
        """Send a request; the caller reads and releases the response."""
        if body is not None and length is not None:
            headers = {**headers, "content-length": str(length)}
        elif body is None and method in ("POST", "PUT", "PATCH"):
            headers = {**headers, "content-length": "0"}
        try:
            return await self.session.request(
                method, self.base_url + path, headers=headers, data=body, allow_redirects=False,
                compress=None, chunked=None,
            )
        except asyncio.TimeoutError:
            raise UpstreamTimeout("the upstream did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"the upstream cannot be reached ({type(exc).__name__})") from None

    async def order_solicitor(self, order_id: str, headers: dict[str, str]) -> dict | None:
        """The solicitor {source, identifier} of an order as the upstream stores it; None if no such order."""
        cached = self.solicitors.get(order_id, False)
        if cached is not False:
            return cached
        resp = await self.send("GET", f"/orders/{order_id}", {**headers, "accept": "application/json"})
        async with resp:
            try:
                if resp.status == 404:
                    return None
                if resp.status != 200:
                    raise UpstreamUnavailable(f"the upstream answered {resp.status} to an order look-up")
                order = json.loads(await resp.read())
            except asyncio.TimeoutError:
                raise UpstreamTimeout("the upstream did not answer in time") from None
            except (aiohttp.ClientError, ValueError):
                raise UpstreamUnavailable("the upstream's order is not readable JSON") from None
        solicitor = order.get("solicitor") if isinstance(order, dict) else None
        if not isinstance(solicitor, dict):
            raise UpstreamUnavailable("the upstream's order has no solicitor")
        found = {"source": solicitor.get("source"), "identifier": solicitor.get("identifier")}
        self.solicitors.put(order_id, found)
        return found

    async def ready(self) -> str | None:
        """None when the upstream answers over HTTP, else why not."""
        try:
            async with self.session.get(self.base_url + "/", timeout=aiohttp.ClientTimeout(total=3)) as resp:
                await resp.read()
            return None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return f"upstream unreachable ({type(exc).__name__})"
