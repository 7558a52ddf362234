"""Where rate-limit state lives: in this process (memory), or shared through Redis (limits_redis.py).

Both answer `check(cells)` with a core.ratelimit.Verdict; a storage that cannot
be used raises StorageError, and `rate_limit.on_storage_error` decides whether
that denies (503) or allows.
"""

from __future__ import annotations

import time
from typing import Callable, Protocol

from gateway.core.policy import Rate
from gateway.core.ratelimit import Verdict, combine
from gateway.shell.limits_redis import RedisStorage


class Storage(Protocol):
    async def check(self, cells: list[tuple[str, Rate]]) -> Verdict: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class MemoryStorage:
    """Limits kept in this process: right for one gateway process on one machine."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000):
        self.clock, self.max_keys = clock, max_keys
        self._tats: dict[str, float] = {}

    def check_now(self, cells: list[tuple[str, Rate]]) -> Verdict:
        now = self.clock()
        verdict, tats = combine(now, [(self._tats.get(key, now), rate) for key, rate in cells])
        if verdict.allowed:
            if len(self._tats) >= self.max_keys:
                self._forget_idle(now)
            for (key, _), tat in zip(cells, tats):
                self._tats[key] = tat
        return verdict

    async def check(self, cells: list[tuple[str, Rate]]) -> Verdict:
        return self.check_now(cells)

    def _forget_idle(self, now: float) -> None:
        for key in [k for k, tat in self._tats.items() if tat <= now]:
            del self._tats[key]

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


def storage_from_url(url: str) -> Storage:
    if url == "memory":
        return MemoryStorage()
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStorage(url)
    raise ValueError(f"rate_limit.storage must be memory or a redis:// URL, not {url!r}")
