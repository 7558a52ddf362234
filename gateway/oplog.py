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
    """Counts of one kind of event by reason, flushed as one line a minute."""

    def __init__(self, kind: str):
        self.kind = kind
        self.counts: collections.Counter[str] = collections.Counter()
        self.seen: set[str] = set()

    def add(self, reason: str, **fields) -> None:
        if reason not in self.seen:
            self.seen.add(reason)
            event(self.kind, reason=reason, first=True, **fields)
        else:
            self.counts[reason] += 1

    def flush(self) -> None:
        if self.counts:
            event(self.kind + "_summary", interval_s=SUMMARY_INTERVAL_S, counts=dict(self.counts))
            self.counts.clear()
