"""The operational log: one JSON line an event on stdout, apart from the audit log.

Events that can come in floods (refused handshakes, upstream errors) are
summarised: the first of a kind is logged at once, the rest counted and
logged as one line a minute.
"""

from __future__ import annotations

import collections
import json
import sys
import time

SUMMARY_INTERVAL_S = 60.0


def event(kind: str, **fields) -> None:
    sys.stdout.write(json.dumps({"ts": round(time.time(), 3), "event": kind, **fields}) + "\n")
    sys.stdout.flush()


class Summary:
    """Events of one kind: a detailed line for each new (reason, key) of the minute, up to
    MAX_DETAILED of them, the rest counted by reason and logged as one line a minute."""

    MAX_DETAILED = 20

    def __init__(self, kind: str):
        self.kind = kind
        self.counts: collections.Counter[str] = collections.Counter()
        self.seen: set[tuple[str, str | None]] = set()

    def add(self, reason: str, key: str | None = None, **fields) -> None:
        if (reason, key) not in self.seen and len(self.seen) < self.MAX_DETAILED:
            self.seen.add((reason, key))
            event(self.kind, reason=reason, first=True, **fields)
        else:
            self.counts[reason] += 1

    def flush(self) -> None:
        if self.counts:
            event(self.kind + "_summary", interval_s=SUMMARY_INTERVAL_S, counts=dict(self.counts))
            self.counts.clear()
        self.seen.clear()
