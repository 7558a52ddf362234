"""Rate limits: GCRA arithmetic (the storages are shell/limits.py and shell/limits_redis.py).

Each limit is a generic cell rate: `rate` requests a second on average with
bursts of up to `burst`. Its whole state is one number, the theoretical
arrival time (TAT). A request is checked against the client's limit and the
operation's limit together and counts against both only when both allow it.
The arithmetic is plain functions, used by the memory storage and mirrored by
the Redis script, which does the same sums inside Redis.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from gateway.core.operations import Operation
from gateway.core.policy import Policy, Rate


class Verdict(NamedTuple):
    """A rate-limit check's outcome (a tuple: made on every request, so cheap to build)."""

    allowed: bool
    limit: int             # the burst of the limit that binds
    remaining: int         # requests left right now under every limit
    reset_s: float         # seconds until the binding limit (the one Limit names) is full again
    retry_after_s: float   # when refused: seconds until a request would pass

    def headers(self) -> dict[str, str]:
        out = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(max(0, math.ceil(self.reset_s))),
        }
        if not self.allowed:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return out


class StorageError(Exception):
    """The rate-limit storage cannot be used (for example Redis is down)."""


EPSILON = 1e-6  # seconds: 1/rate is rarely exact in binary, and Redis keeps TATs to the microsecond


def gcra(tat: float, now: float, rate: Rate) -> tuple[bool, float, int, float, float]:
    """One GCRA step: (allowed, new TAT if allowed, remaining, reset seconds, retry-after seconds)."""
    interval = 1.0 / rate.rate
    capacity = rate.burst * interval
    new_tat = max(tat, now) + interval
    if new_tat - now > capacity + EPSILON:
        retry = new_tat - now - capacity
        remaining = max(0, int((capacity - (max(tat, now) - now)) / interval))
        return False, tat, remaining, max(tat, now) - now, retry
    remaining = max(0, int((capacity - (new_tat - now)) / interval + EPSILON))
    return True, new_tat, remaining, new_tat - now, 0.0


def combine(now: float, cells: list[tuple[float, Rate]]) -> tuple[Verdict, list[float]]:
    """Check every (TAT, rate) cell; the verdict and the TATs to store (unchanged when refused).

    The binding limit is the one with the fewest requests left (a refusing one first)."""
    results = [gcra(tat, now, rate) for tat, rate in cells]
    allowed = all(r[0] for r in results)
    binding = 0
    for i in range(1, len(results)):
        if (results[i][0], results[i][2]) < (results[binding][0], results[binding][2]):
            binding = i
    verdict = Verdict(allowed, cells[binding][1].burst, min(r[2] for r in results), results[binding][3],
                      max(r[4] for r in results))
    tats = [r[1] for r in results] if allowed else [tat for tat, _ in cells]
    return verdict, tats


# Requests whose certificate maps to no policy share this one limit (per storage: per instance with
# memory, across instances with Redis). Each such request is a 403 and an audit line; without a bound,
# one certificate from a trusted CA that no policy names could fill the audit disk.
UNMAPPED = Rate(rate=10.0, burst=20)
UNMAPPED_KEY = "!unmapped"   # no client name can be this (policy.CLIENT_RE)


def refused_limits(policy: Policy | None) -> list[tuple[str, Rate]]:
    """The cells a request refused before its operation was admitted counts against.

    Every request of an identified client counts against the client's limit, refused ones
    included; the operation's limit counts admitted operations only. A client without a limit
    of its own has its refusals counted against a bound of UNMAPPED's size, and the
    certificates of no policy share one such bound.
    """
    if policy is None:
        return [(UNMAPPED_KEY, UNMAPPED)]
    if policy.rate_limit.client is None:   # no limit of its own: its refusals are bounded all the same
        return [(f"!refused:{policy.client}", UNMAPPED)]
    return [(policy.client, policy.rate_limit.client)]


def limits_for(policy: Policy, operation: Operation) -> list[tuple[str, Rate]]:
    """The (key, rate) cells that apply to a call: the client's limit and the operation's."""
    cells = []
    if policy.rate_limit.client is not None:
        cells.append((policy.client, policy.rate_limit.client))
    op_rate = policy.rate_limit.operations.get(operation)
    if op_rate is not None:
        cells.append((f"{policy.client}:{operation.value}", op_rate))
    return cells
