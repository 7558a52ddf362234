"""Rate limits shared by several gateway processes through Redis.

One Lua script a decision: it reads every cell's TAT, does the GCRA sums of
ratelimit.py with Redis's own clock (so gateways on machines whose clocks
differ still agree), and stores the new TATs only when every limit allows
the request. Redis runs scripts one at a time, so the decision is atomic.

Checks are pipelined: those that come while a round trip is under way go together
in the next one (one pipeline of EVALSHA calls, each still its own atomic
decision). A round trip costs the event loop far more than a decision (a send
that wakes Redis, a wake-up for the answer, redis-py's bookkeeping), so a loaded
gateway pays it once a batch instead of once a request, and an idle one sends at
once, as before.
"""

from __future__ import annotations

import asyncio
import hashlib

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from gateway.core.policy import Rate
from gateway.core.ratelimit import StorageError, Verdict

KEY_PREFIX = "gateway:ratelimit:"

SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local allowed = 1
local tats = {}
local remaining, reset, retry = nil, 0, 0
local limit, bind_denied, bind_remaining = 0, 1, nil
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local capacity = burst * interval
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  local base = math.max(tat, now)
  local new_tat = base + interval
  local ok, rem, reset_i
  if new_tat - now > capacity + 0.000001 then
    ok = 0
    allowed = 0
    rem = math.max(0, math.floor((capacity - (base - now)) / interval))
    reset_i = base - now
    retry = math.max(retry, new_tat - now - capacity)
  else
    ok = 1
    rem = math.max(0, math.floor((capacity - (new_tat - now)) / interval + 0.000001))
    reset_i = new_tat - now
  end
  tats[i] = {new_tat, capacity}
  if remaining == nil or rem < remaining then remaining = rem end
  if bind_remaining == nil or ok < bind_denied or (ok == bind_denied and rem < bind_remaining) then
    bind_denied, bind_remaining, limit, reset = ok, rem, burst, reset_i
  end
end
if allowed == 1 then
  for i = 1, #KEYS do
    redis.call('SET', KEYS[i], string.format('%.6f', tats[i][1]), 'PX', math.ceil(tats[i][2] * 1000) + 1000)
  end
end
return {allowed, limit, remaining, string.format('%.6f', reset), string.format('%.6f', retry)}
"""


MAX_BATCH = 1000   # checks a round trip at the most


class RedisStorage:
    def __init__(self, url: str):
        self.url = url
        self.client = aioredis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0,
                                        retry_on_timeout=False, health_check_interval=0)
        self.sha = hashlib.sha1(SCRIPT.encode()).hexdigest()
        self._waiting: list[tuple[list[str], list[str], asyncio.Future]] = []
        self._sender: asyncio.Task | None = None   # the round trips under way, while checks wait

    async def check(self, cells: list[tuple[str, Rate]]) -> Verdict:
        keys = [KEY_PREFIX + key for key, _ in cells]
        args: list[str] = []
        for _, rate in cells:
            args += [repr(1.0 / rate.rate), str(rate.burst)]
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._waiting.append((keys, args, done))
        if self._sender is None:
            self._sender = loop.create_task(self._send(), name="rate-limit-redis")
        allowed, limit, remaining, reset, retry = await done
        return Verdict(bool(allowed), int(limit), int(remaining), float(reset), float(retry))

    async def _send(self) -> None:
        """Send what waits, a batch a round trip, until nothing does."""
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
                try:
                    replies = await self._decide(batch)
                except (RedisError, OSError) as exc:
                    replies = [exc] * len(batch)
                for (_, _, done), reply in zip(batch, replies):
                    if done.done():
                        continue  # its request gave up waiting
                    if isinstance(reply, Exception):
                        done.set_exception(StorageError(f"Redis rate-limit storage: {type(reply).__name__}"))
                    else:
                        done.set_result(reply)
        finally:
            self._sender = None

    async def _decide(self, batch: list) -> list:
        """One reply a check, in order: the script's result, or the error Redis answered it with."""
        replies = await self._pipeline(batch)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:  # the first call, a restarted Redis, a SCRIPT FLUSH: load it and run those again
            await self.client.script_load(SCRIPT)
            for i, reply in zip(missing, await self._pipeline([batch[i] for i in missing])):
                replies[i] = reply
        return replies

    async def _pipeline(self, batch: list) -> list:
        pipe = self.client.pipeline(transaction=False)
        for keys, args, _ in batch:
            pipe.evalsha(self.sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            raise StorageError(f"Redis rate-limit storage: {type(exc).__name__}") from None

    async def close(self) -> None:
        await self.client.aclose()


