"""Order look-ups: the solicitor of an order, as the upstream stores it, for order-scoped operations.

The gateway asks the upstream `GET /orders/{id}` with its own headers only (a
client's conditional header would turn an existing order into a 304 where an
absent one is a 404) and caches the answer briefly, found and absent orders
alike, so that "not yours" and "no such order" take the same time. The cache
is bounded, so a flood of ids keeps memory flat.
"""

from __future__ import annotations

import json

from aiohttp import ClientPayloadError
from cachetools import TTLCache

from gateway.shell.upstream import Upstream, too_slow, unavailable

_UNKNOWN = object()


class Orders:
    def __init__(self, upstream: Upstream, ttl_s: float = 5.0, max_items: int = 10000):
        self.upstream = upstream
        self.solicitors: TTLCache = TTLCache(maxsize=max_items, ttl=ttl_s)  # order id -> solicitor, or None

    async def solicitor(self, order_id: str, headers: dict[str, str]) -> dict | None:
        """The solicitor {source, identifier} of an order as the upstream stores it; None if no such order."""
        cached = self.solicitors.get(order_id, _UNKNOWN)
        if cached is not _UNKNOWN:
            return cached
        resp = await self.upstream.send("GET", f"/orders/{order_id}", {**headers, "accept": "application/json"})
        async with resp:
            try:
                if resp.status == 404:
                    await resp.read()
                    self.solicitors[order_id] = None
                    return None
                if resp.status != 200:
                    raise unavailable(f"the upstream answered {resp.status} to an order look-up")
                order = json.loads(await resp.read())
            except TimeoutError:
                raise too_slow() from None
            except (ClientPayloadError, ValueError):
                raise unavailable("the upstream's order is not readable JSON") from None
        solicitor = order.get("solicitor") if isinstance(order, dict) else None
        if not isinstance(solicitor, dict):
            raise unavailable("the upstream's order has no solicitor")
        found = {"source": solicitor.get("source"), "identifier": solicitor.get("identifier")}
        self.solicitors[order_id] = found
        return found

    def forget(self, order_id: str) -> None:
        """An order was created or deleted: its cached look-up (found or absent) no longer holds."""
        self.solicitors.pop(order_id, None)
