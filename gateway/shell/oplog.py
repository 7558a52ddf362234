"""The operational log: one JSON line an event on stdout, apart from the audit log.

Writing never blocks the caller. A line goes into a bounded queue that a thread
of its own writes to stdout, so a stdout nobody reads (a stalled log collector,
a full pipe) stops that thread, never the event loop: the gateway goes on
serving, lines past the queue's bound are dropped and counted
(`gateway_log_lines_dropped_total`), and once stdout takes lines again a
`log_lines_dropped` line says how many were lost. Python's `logging` records
(aiohttp's and the gateway's own warnings) go the same way, as `log` events.

Events that can come in floods (refused handshakes, upstream errors) are
summarised: the first of a kind is logged at once, the rest counted and
logged as one line a minute.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import json
import logging
import os
import select
import sys
import threading
import time
import traceback
from typing import Callable

from gateway.core.audit import timestamp

SUMMARY_INTERVAL_S = 60.0
QUEUE_LINES = 256          # lines waiting for stdout at most; past that they are dropped and counted


class Writer:
    """A bounded queue of lines and the thread that writes them to stdout: the `sys.stdout` of the
    moment each line was put (its file descriptor, or the object itself when it has none, as under
    pytest's capture)."""

    def __init__(self, capacity: int = QUEUE_LINES):
        self.capacity = capacity
        self.dropped = 0                     # lines dropped since start
        self.on_drop: Callable[[int], None] = lambda count: None   # told how many lines were dropped
        self._lines: collections.deque[tuple[object, str]] = collections.deque()
        self._unreported = 0                 # dropped lines the log has not said it lost yet
        self._busy = False                   # the thread holds lines it has not finished writing
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def put(self, line: str) -> None:
        with self._cond:
            if len(self._lines) >= self.capacity:
                self.dropped += 1
                self._unreported += 1
                drop = self.on_drop
            else:
                self._lines.append((sys.stdout, line))
                self._cond.notify()
                drop = None
            if self._thread is None or not self._thread.is_alive():
                if self._thread is None:
                    atexit.register(self.drain)  # the last lines (stop) get out, unless stdout is stuck
                self._thread = threading.Thread(target=self._run, name="oplog", daemon=True)
                self._thread.start()
        if drop is not None:
            drop(1)

    def drain(self, timeout_s: float = 2.0) -> bool:
        """Wait until every queued line is written (at exit, and for tests); False when stdout would not take them."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._lines or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._lines:
                    self._cond.wait()
                lines = list(self._lines)
                self._lines.clear()
                lost, self._unreported = self._unreported, 0
                self._busy = True
            if lost:
                lines.insert(0, (lines[0][0], _line("log_lines_dropped", count=lost,
                                                    detail="stdout did not take lines for a while; these were dropped")))
            failed = 0
            for out, group in itertools.groupby(lines, key=lambda item: item[0]):
                texts = [line for _, line in group]
                failed += len(texts) - _write(out, texts)
            with self._cond:
                self._busy = False
                if failed:   # stdout closed or broken: those lines are lost too
                    self.dropped += failed
                    self._unreported += failed
                self._cond.notify_all()
            if failed:
                self.on_drop(failed)


def _write(out, lines: list[str]) -> int:
    """Write whole lines to `out`; how many were written before it failed.

    To a file descriptor, in chunks of whole lines of at most PIPE_BUF bytes: a pipe keeps such a
    write in one piece, so the processes of `--workers N`, which share stdout, never interleave inside
    a line. A stdout left non-blocking by whoever started the gateway is waited on, not given up on.
    """
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):
        try:
            out.write("".join(lines))
            out.flush()
        except (OSError, ValueError):
            return 0
        return len(lines)
    written = 0
    for chunk, count in _chunks(lines):
        try:
            while chunk:
                try:
                    chunk = chunk[os.write(fd, chunk):]
                except BlockingIOError:
                    select.select([], [fd], [])
        except (OSError, ValueError):
            return written
        written += count
    return written


def _chunks(lines: list[str]):
    """(bytes, how many lines) of at most PIPE_BUF bytes each, but for a line longer than that alone."""
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        data = line.encode()
        if chunk and size + len(data) > select.PIPE_BUF:
            yield b"".join(chunk), len(chunk)
            chunk, size = [], 0
        chunk.append(data)
        size += len(data)
    if chunk:
        yield b"".join(chunk), len(chunk)


def _line(kind: str, **fields) -> str:
    return json.dumps({"ts": timestamp(time.time()), "event": kind, **fields}, default=str) + "\n"


writer = Writer()


def event(kind: str, **fields) -> None:
    writer.put(_line(kind, **fields))


def drain(timeout_s: float = 2.0) -> bool:
    return writer.drain(timeout_s)


class Handler(logging.Handler):
    """Python logging records as `log` events on the operational log (one line, the traceback a field)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {"level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
            if record.exc_info and record.exc_info[0] is not None:
                fields["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
                fields["traceback"] = "".join(traceback.format_exception(*record.exc_info))
            event("log", **fields)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def use_for_logging(level: int = logging.WARNING) -> None:
    """Route Python logging to the operational log instead of a stderr that could block."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(Handler())
    root.setLevel(level)


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
