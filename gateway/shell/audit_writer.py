"""Writing the audit log durably, without stalling the event loop.

`commit(record)` returns once the record's line is on disk (fsync'ed): the
pipeline calls it when an answer is decided and sends nothing before it
returns, so a crash never loses the record of an answered request. Lines are
group-committed: one background task takes every record waiting at that
moment, seals them into the chain in order, and writes them with one write and
one fsync, both done by a helper process (appender.py: a thread would have to take
the GIL back from the busy event loop); records that arrive meanwhile form the next group.
With `audit.sync: batch`, `commit` does not wait and groups gather for 10 ms.

When a group cannot be written (missing folder, disk full, the file removed),
the writer is unhealthy: the gateway answers 503 to new requests until a retry
succeeds, the sealed lines are kept and written then (no gap in the chain), and
answers waiting on them are held until their request's time runs out. A group
that failed half-way is cut back off the file. On start, a torn last line (a
crash mid-write) is moved aside and the first new record says so.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import stat
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from gateway.core.audit import GENESIS, Redactor, last_hash, recovered, seal, sealed_hash, timestamp
from gateway.shell.appender import Appender, Replaced
from gateway.shell.appender_child import replaced

log = logging.getLogger("gateway.audit")
RETRY_S = 1.0
BATCH_INTERVAL_S = 0.01
MAX_PENDING = 100_000
TAIL_BYTES = 65536
WRITE_CHUNK = 64 * 1024    # bytes a write+fsync at the most: a backlog goes out a chunk at a time
SUMMARISE_AFTER = 1000     # queued records past which 503s of a broken log are counted, not kept
EXPIRE_EVERY_S = 0.25      # how often answers waiting too long for their line are given up on


class AuditUnavailable(Exception):
    """A record could not be put on disk in time."""


def load_key(key_file: Path | None) -> bytes | None:
    if key_file is None:
        return None
    key = key_file.read_bytes().strip()
    if len(key) < 16:
        raise ValueError(f"{key_file}: an audit key needs at least 16 bytes")
    return key


def redaction_key(audit_path: Path, key: bytes | None) -> bytes:
    """The key of redacted fields: derived from audit.key_file, else kept beside the log."""
    if key:
        import hashlib
        import hmac

        return hmac.new(key, b"gateway audit redaction", hashlib.sha256).digest()
    path = audit_path.parent / "audit-redact.key"
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        pass  # the log folder is unusable; the writer reports that
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        new = secrets.token_bytes(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(new.hex())
        except OSError:
            pass  # the log folder is unusable; the writer reports that
        return new


def move_torn_tail(path: Path, now: float) -> tuple[bytes, str] | None:
    """Cut an incomplete last line off the log into PATH.torn-<UTC time>; (its bytes, that file's name)."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return None
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return None
        end = size  # find the last newline, reading backwards
        keep = 0
        while end > 0:
            start = max(0, end - TAIL_BYTES)
            f.seek(start)
            chunk = f.read(end - start)
            at = chunk.rfind(b"\n")
            if at >= 0:
                keep = start + at + 1
                break
            end = start
        f.seek(keep)
        torn = f.read()
        stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = path.with_name(f"{path.name}.torn-{stamp}")
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(torn)
            out.flush()
            os.fsync(out.fileno())
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return torn, aside.name


class _Partial(OSError):
    """A write that failed after `done` lines were on disk."""

    def __init__(self, exc: OSError, done: int):
        super().__init__(exc.errno, exc.strerror)
        self.cause, self.done = exc, done


class AuditWriter:
    def __init__(self, path: Path, key: bytes | None, redactor: Redactor | None, sync: str = "answer",
                 on_written: Callable[[int], None] = lambda n: None,
                 on_dropped: Callable[[], None] = lambda: None):
        self.path, self.key, self.redactor = path, key, redactor
        self.durable = sync == "answer"
        self.on_written, self.on_dropped = on_written, on_dropped
        self.problem: str | None = None
        self.prev = GENESIS
        self._fd: int | None = None
        self._chained = False   # the chain's head is known (read from the file): only then are lines sealed
        self._replaced_after: str | None = None   # the last hash before the file was replaced under us
        self._summarised: tuple[int, str | None, str | None] = (0, None, None)   # count, first ts, last ts
        self._pending: list[tuple[dict, asyncio.Future | None]] = []
        self._deadlines: collections.deque[tuple[float, asyncio.Future]] = collections.deque()  # commit order
        self._expiry: asyncio.TimerHandle | None = None
        # sealed, in order, not yet on disk: (record, line, the commit waiting on it); the record is kept
        # so that it can be sealed again into a new chain if the file is replaced before it is written
        self._sealed: list[tuple[dict, bytes, asyncio.Future | None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._last_write = 0.0
        self._written_prev = GENESIS   # the hash of the last line on disk (the old file's end, if replaced)
        self._appender = Appender()

    @property
    def healthy(self) -> bool:
        return self.problem is None

    async def start(self) -> None:
        try:
            self._appender.start()
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            for record in self._prepare_file():
                self._sealed.append((record, self._seal(record), None))
        except OSError as exc:
            self._fail(exc)
        self._task = asyncio.create_task(self._run(), name="audit-writer")
        self._expiry = asyncio.get_running_loop().call_later(EXPIRE_EVERY_S, self._expire)

    # -- the file and the head of its chain (run in a worker thread) ----------------------------

    def _open(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if stat.S_ISREG(os.fstat(self._fd).st_mode):  # the file's name is on disk too, not only its lines
            folder = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

    def _replaced(self) -> bool:
        """Whether the path no longer names the open file (removed, renamed, replaced): two stat calls."""
        return self._fd is not None and replaced(self._fd, self.path)

    def _prepare_file(self) -> list[dict]:
        """Open the log and learn the head of its chain before anything is sealed; the records that
        must come first (a torn tail moved aside, a file replaced under us). Raises OSError."""
        if self._fd is not None and self._chained:
            if not self._replaced():
                return []
            # Removed, renamed (logrotate) or replaced while we ran: the path starts a chain of its own,
            # and its first record says where the last one ended, so neither file fails to verify.
            log.warning("audit log %s was removed or replaced while the gateway ran; writing a new one", self.path)
            self._replaced_after, self._chained = self._written_prev, False
        self._open()
        first = self._continue_chain()
        self._chained, self._written_prev = True, self.prev
        if self._replaced_after is not None:
            first.append({"ts": timestamp(time.time()), "event": "reopened", "previous_hash": self._replaced_after,
                          "reason": "the audit log file was removed, renamed or replaced while the gateway ran"})
            self._replaced_after = None
        return first

    def _continue_chain(self) -> list[dict]:
        if not self.path.is_file():
            return []  # a device such as /dev/full has no chain to continue
        moved = move_torn_tail(self.path, time.time())
        with open(self.path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read()
        self.prev = last_hash(tail) or GENESIS
        if moved is None:
            return []
        torn, name = moved
        log.warning("audit log %s ended in a torn line (%d bytes): moved to %s", self.path, len(torn), name)
        return [recovered(torn, name, time.time())]

    def _fail(self, exc: OSError) -> None:
        problem = f"cannot write {self.path}: {exc.strerror or exc}"
        if problem != self.problem:
            log.error("audit: %s", problem)
        self.problem = problem

    # -- queueing ------------------------------------------------------------------------------------

    def _room(self) -> bool:
        if len(self._pending) + len(self._sealed) >= MAX_PENDING:
            self.on_dropped()
            return False
        return True

    def submit(self, record: dict, summarisable: bool = False) -> None:
        """Queue one record without waiting for it (a line that no answer waits on).

        `summarisable` records (the 503s answered because the log cannot be written) are kept one
        by one only up to SUMMARISE_AFTER queued records while the log is broken; past that they
        are counted, and one "summarised" record says how many, so that the backlog stays small
        enough to fit the room a full disk gets back.
        """
        if summarisable and not self.healthy and len(self._pending) + len(self._sealed) >= SUMMARISE_AFTER:
            ts = record.get("ts")
            self._summarised = (self._summarised[0] + 1, self._summarised[1] or ts, ts)
            return
        if self._room():
            self._pending.append((self._redacted(record), None))
            self._wake.set()

    async def commit(self, record: dict, timeout_s: float | None) -> None:
        """Queue one record and, under `sync: answer`, return once its line is on disk.

        Raises AuditUnavailable when that does not happen within `timeout_s`; the record
        stays queued and is written once the log can be written again.
        """
        if not self.durable:
            self.submit(record)
            return
        if not self._room():
            raise AuditUnavailable("too many audit records are waiting to be written")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._pending.append((self._redacted(record), done))
        self._deadlines.append((loop.time() + (timeout_s if timeout_s is not None else 1e9), done))
        self._wake.set()
        await done  # AuditUnavailable when _expire gives up on it (one timer for all, not one each)

    def _expire(self) -> None:
        """Every EXPIRE_EVERY_S: fail the commits whose time is up (their records stay queued)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._deadlines and (self._deadlines[0][1].done() or self._deadlines[0][0] <= now):
            _, done = self._deadlines.popleft()
            if not done.done():
                done.set_exception(AuditUnavailable(self.problem or "the audit log was not written in time"))
        self._expiry = loop.call_later(EXPIRE_EVERY_S, self._expire)

    def _redacted(self, record: dict) -> dict:
        """Redact when queued, once: a record sealed again (into a new chain) keeps its pseudonyms."""
        if self.redactor is None:
            return record
        try:
            return self.redactor.apply(record)
        except (TypeError, ValueError) as exc:  # never let one odd record stop the log
            return {"request_id": record.get("request_id"), "error": f"could not be redacted ({exc})"}

    def _seal(self, record: dict) -> bytes:
        try:
            line, self.prev = seal(record, self.prev, self.key)
        except (TypeError, ValueError) as exc:  # never let one odd record stop the log
            log.error("audit: record %s could not be sealed (%s)", record.get("request_id"), exc)
            line, self.prev = seal({"request_id": record.get("request_id"), "error": str(exc)},
                                   self.prev, self.key)
        return line

    # -- the writer ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending and not self._closing and (self.healthy or not self._sealed):
                self._wake.clear()  # idle: wait for records, or for the next retry while unhealthy
                try:
                    await asyncio.wait_for(self._wake.wait(), None if self.healthy else RETRY_S)
                except asyncio.TimeoutError:
                    pass
            elif not self.healthy and not self._closing:
                await asyncio.sleep(RETRY_S)
            if self.healthy and not self._closing and not self.durable:
                # batch: let records gather for fewer, larger writes and fsyncs
                await asyncio.sleep(max(0.0, self._last_write + BATCH_INTERVAL_S - loop.time()))
            self._last_write = loop.time()
            try:
                # the chain's head must be known before anything is sealed: read it from the file when it
                # is not (at start, after a failure); a file replaced under us is noticed by the write itself
                first = [] if self._chained and self.healthy else await self._rechain(loop)
            except OSError as exc:
                self._fail(exc)  # the records wait, unsealed, until the chain's head is known
            except Exception as exc:  # never let the writer die: it is what everything waits on
                log.exception("audit: unexpected error")
                self._fail(OSError(str(exc)))
            else:
                group, self._pending = self._pending, []
                if self._summarised[0]:
                    count, since, until = self._summarised
                    self._summarised = (0, None, None)
                    first.append({"ts": timestamp(time.time()), "event": "summarised", "count": count,
                                  "from_ts": since, "to_ts": until, "status": 503, "reason":
                                  "answers 503 (audit_unavailable) while the audit log could not be written, "
                                  "counted here instead of one line each"})
                self._sealed += [(record, self._seal(record), None) for record in first]
                self._sealed += [(record, self._seal(record), done) for record, done in group]
                if self._sealed:
                    try:
                        await self._write_sealed(loop)
                    except Exception as exc:  # never let the writer die: it is what everything waits on
                        log.exception("audit: unexpected error")
                        self._fail(OSError(str(exc)))
                else:
                    self.problem = None
            if self._closing and not self._pending and (not self._sealed or not self.healthy):
                return

    async def _rechain(self, loop) -> list[dict]:
        """Read the chain's head from the file again (at start, after a failure, after a replacement).

        When the head moved (a new or replaced file), every record sealed but not yet written is sealed
        again after it, so that no line chained to the old head lands in the new file. Returns the
        records that must come before those (a torn tail recovered, a file reopened).
        """
        head = self.prev if self._chained else None
        first = await loop.run_in_executor(None, self._prepare_file)
        if self._sealed and self.prev != head:
            waiting, self._sealed = self._sealed, []
            self._sealed = [(record, self._seal(record), None) for record in first]
            self._sealed += [(record, self._seal(record), done) for record, _, done in waiting]
            return []
        return first

    async def _write_sealed(self, loop) -> None:
        try:
            written = await self._write_lines([line for _, line, _ in self._sealed])
        except Replaced:
            # Removed, renamed (logrotate) or replaced while we ran: nothing was written; the path starts a
            # chain of its own (see _rechain), and the waiting records go into it.
            try:
                first = await self._rechain(loop)
            except OSError as exc:
                self._fail(exc)
                return
            self._sealed += [(record, self._seal(record), None) for record in first]
            return await self._write_sealed(loop)
        except _Partial as exc:
            written = exc.done
            self._fail(exc.cause)
        else:
            self.problem = None
        done, self._sealed = self._sealed[:written], self._sealed[written:]
        if done:
            self._written_prev = sealed_hash(done[-1][1])
        for _, _, waiter in done:
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if written:
            self.on_written(written)

    async def _write_lines(self, lines: list[bytes]) -> int:
        """Write and fsync the lines in chunks of at most WRITE_CHUNK bytes, so that a backlog larger than
        the room a full disk has freed still goes out a chunk at a time. Returns how many are on disk;
        a chunk that failed half-way is cut back off the file (raises _Partial with the count).
        The helper process does the writing, and checks first that the path still names the file."""
        done = 0
        while done < len(lines):
            size, end = 0, done
            while end < len(lines) and (end == done or size + len(lines[end]) <= WRITE_CHUNK):
                size += len(lines[end])
                end += 1
            try:
                await self._appender.append(self._fd, str(self.path), b"".join(lines[done:end]), done == 0)
            except OSError as exc:
                raise _Partial(exc, done) from None
            done = end
        return done

    async def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then close the file."""
        self._closing = True
        self._wake.set()
        if self._expiry is not None:
            self._expiry.cancel()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout_s)
            except asyncio.TimeoutError:
                self._task.cancel()
                self._appender.close()
                return  # a rechain may still be under way in its thread: its descriptor goes with the process
        self._appender.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
