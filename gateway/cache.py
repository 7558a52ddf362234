"""A small TTL cache with a size bound, for order -> solicitor look-ups.

The solicitor of an order never changes, so a short cache only saves the
upstream round trip; the bound keeps memory flat under a flood of ids.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Generic, TypeVar

V = TypeVar("V")
_MISSING = object()


class TTLCache(Generic[V]):
    def __init__(self, ttl_s: float, max_items: int, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.max_items, self.clock = ttl_s, max_items, clock
        self._items: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def get(self, key: str, default=None):
        item = self._items.get(key, _MISSING)
        if item is _MISSING:
            return default
        expires, value = item
        if expires <= self.clock():
            del self._items[key]
            return default
        return value

    def put(self, key: str, value: V) -> None:
        self._items.pop(key, None)
        self._items[key] = (self.clock() + self.ttl_s, value)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def discard(self, key: str) -> None:
        self._items.pop(key, None)
