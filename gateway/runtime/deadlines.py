"""Request deadlines: one timer for every request in flight, not one timer each.

asyncio.timeout() arms a timer per request and cancels it when the request is done:
a Timeout object, a TimerHandle pushed on the loop's heap, and a cancelled handle
left there, which together were a measurable share of a small request's cost.
Here a request's deadline is an entry in a dict, and one sweep every TICK_S cancels
the tasks past theirs, as asyncio.timeout does (CancelledError inside, TimeoutError
to the caller). A request's time limit is kept to within TICK_S (0.1 s), which is
nothing beside `limits.request_timeout_s` (seconds).
"""

from __future__ import annotations

import asyncio

TICK_S = 0.1


class Deadline:
    __slots__ = ("when", "task", "cancelling", "expired", "settled")

    def __init__(self, when: float, task: asyncio.Task):
        self.when, self.task, self.cancelling = when, task, task.cancelling()
        self.expired = self.settled = False

    def settle(self) -> bool:
        """Take this deadline's cancel back (once), as asyncio.timeout does when it exits. True when it
        was the deadline's alone: then a CancelledError in the task is a timeout, not a cancel."""
        if not self.expired or self.settled:
            return False
        self.settled = True
        return self.task.uncancel() <= self.cancelling


class Deadlines:
    def __init__(self) -> None:
        self._live: dict[Deadline, None] = {}
        self._timer: asyncio.TimerHandle | None = None

    def start(self, seconds: float) -> Deadline:
        """The current task's deadline, `seconds` from now; end() it when the guarded part is over."""
        loop = asyncio.get_running_loop()
        deadline = Deadline(loop.time() + seconds, asyncio.current_task())
        self._live[deadline] = None
        if self._timer is None:
            self._timer = loop.call_at(loop.time() + TICK_S, self._sweep)
        return deadline

    def end(self, deadline: Deadline) -> None:
        """The guarded part is over (its cancel taken back, had it fired and been swallowed on the way)."""
        self._live.pop(deadline, None)
        deadline.settle()

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for deadline in [d for d in self._live if d.when <= now]:
            del self._live[deadline]
            deadline.expired = True
            deadline.task.cancel()
        self._timer = loop.call_at(now + TICK_S, self._sweep) if self._live else None

