"""Order look-ups: the solicitor of an order, as the upstream stores it, for order-scoped operations.

The gateway asks the upstream `GET /orders/{id}` with its own headers only (a
client's conditional header would turn an existing order into a 304 where an
absent one is a 404) and caches the answer briefly, found and absent orders
alike, so that "not yours" and "no such order" take the same time.

The cache is per client: an answer is reused only for the client that asked
before. Shared, it would answer beta at once about an order alpha has just
read and after an upstream round trip about one that does not exist, and the
difference would tell beta which ids are real. The cache is bounded, so a
flood of ids keeps memory flat.
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
        # (client, order id) -> solicitor, or None: each entry lives ttl_s from its own client's look-up
        self.solicitors: TTLCache = TTLCache(maxsize=max_items, ttl=ttl_s)
        self._clients: set[str] = set()   # the clients that have entries, so forget() can reach them all

    async def solicitor(self, order_id: str, client: str, headers: dict[str, str]) -> dict | None:
        """The solicitor {source, identifier} of an order as the upstream stores it; None if no such order.

        Answered from the cache only when this same client asked before (see the module's docstring).
        """
        cached = self.solicitors.get((client, order_id), _UNKNOWN)
        if cached is not _UNKNOWN:
            return cached
        resp = await self.upstream.send("GET", f"/orders/{order_id}", {**headers, "accept": "application/json"})
        async with resp:
            try:
                if resp.status == 404:
                    await resp.read()
                    self._remember(order_id, client, None)
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
        self._remember(order_id, client, found)
        return found

    def _remember(self, order_id: str, client: str, solicitor: dict | None) -> None:
        self._clients.add(client)
        self.solicitors[(client, order_id)] = solicitor

    def forget(self, order_id: str) -> None:
        """An order was created or deleted: its cached look-up (found or absent) no longer holds."""
        for client in self._clients:   # as many as there are policies
            self.solicitors.pop((client, order_id), None)
