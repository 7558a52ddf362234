"""Rate limits shared by several gateway processes through Redis.

One Lua script a decision: it reads every cell's TAT, does the GCRA sums of
ratelimit.py with Redis's own clock (so gateways on machines whose clocks
differ still agree), and stores the new TATs only when every limit allows
the request. Redis runs scripts one at a time, so the decision is atomic.
"""

from __future__ import annotations


import redis.asyncio as aioredis
from redis.exceptions import RedisError

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


class RedisStorage:
    def __init__(self, url: str):
        self.url = url
        self.client = aioredis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0,
                                        retry_on_timeout=False, health_check_interval=0)
        self.script = self.client.register_script(SCRIPT)

    async def check(self, cells: list[tuple[str, Rate]]) -> Verdict:
        keys = [KEY_PREFIX + key for key, _ in cells]
        args: list[str] = []
        for _, rate in cells:
            args += [repr(1.0 / rate.rate), str(rate.burst)]
        try:
            allowed, limit, remaining, reset, retry = await self.script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise StorageError(f"Redis rate-limit storage: {type(exc).__name__}") from None
        return Verdict(bool(allowed), int(limit), int(remaining), float(reset), float(retry))

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            raise StorageError(f"Redis rate-limit storage: {type(exc).__name__}") from None

    async def close(self) -> None:
        await self.client.aclose()


