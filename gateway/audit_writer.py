"""Writing the audit log without stalling the event loop.

Records are queued as requests finish; a background task seals them into the
chain in order and writes each batch with one write and one fsync in a worker
thread. When a batch cannot be written (missing folder, disk full, no
permission, the file removed), the writer is unhealthy: the gateway answers
503 until a retry succeeds, and the sealed lines are kept and written then, so
the chain has no gap. A batch that failed half-way is cut back off the file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from pathlib import Path
from typing import Callable

from gateway.audit import GENESIS, Redactor, last_hash, seal

log = logging.getLogger("gateway.audit")
RETRY_S = 1.0
BATCH_INTERVAL_S = 0.01
MAX_PENDING = 100_000
TAIL_BYTES = 65536


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
        path.parent.mkdir(parents=True, exist_ok=True)
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


class AuditWriter:
    def __init__(self, path: Path, key: bytes | None, redactor: Redactor | None,
                 on_written: Callable[[int], None] = lambda n: None,
                 on_dropped: Callable[[], None] = lambda: None):
        self.path, self.key, self.redactor = path, key, redactor
        self.on_written, self.on_dropped = on_written, on_dropped
        self.problem: str | None = None
        self.prev = GENESIS
        self._fd: int | None = None
        self._pending: list[dict] = []
        self._sealed: list[bytes] = []   # sealed but not yet on disk
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._last_write = 0.0

    @property
    def healthy(self) -> bool:
        return self.problem is None

    async def start(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open()
            self._continue_chain()
        except OSError as exc:
            self._fail(exc)
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    def _open(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def _continue_chain(self) -> None:
        if not self.path.is_file():
            return  # a device such as /dev/full has no chain to continue
        with open(self.path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read()
        if tail and not tail.endswith(b"\n"):
            log.warning("audit log %s ends in a torn line; the chain continues after it", self.path)
            os.write(self._fd, b"\n")
        self.prev = last_hash(tail) or GENESIS

    def _fail(self, exc: OSError) -> None:
        problem = f"cannot write {self.path}: {exc.strerror or exc}"
        if problem != self.problem:
            log.error("audit: %s", problem)
        self.problem = problem

    def submit(self, record: dict) -> None:
        """Queue one record; it is sealed and written by the background task."""
        if len(self._pending) + len(self._sealed) >= MAX_PENDING:
            self.on_dropped()
            return
        self._pending.append(record)
        self._wake.set()

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
            if self.healthy and not self._closing:
                # Let records gather: fewer, larger writes and fsyncs, and fewer thread hops.
                await asyncio.sleep(max(0.0, self._last_write + BATCH_INTERVAL_S - loop.time()))
            self._last_write = loop.time()
            batch, self._pending = self._pending, []
            for record in batch:
                try:
                    if self.redactor is not None:
                        record = self.redactor.apply(record)
                    line, self.prev = seal(record, self.prev, self.key)
                except (TypeError, ValueError) as exc:  # never let one odd record stop the log
                    log.error("audit: record %s could not be sealed (%s)", record.get("request_id"), exc)
                    line, self.prev = seal({"request_id": record.get("request_id"), "error": str(exc)},
                                           self.prev, self.key)
                self._sealed.append(line)
            if self._sealed:
                data = b"".join(self._sealed)
                try:
                    await loop.run_in_executor(None, self._write, data)
                except OSError as exc:
                    self._fail(exc)
                else:
                    written = len(self._sealed)
                    self._sealed = []
                    self.problem = None
                    self.on_written(written)
            elif not self.healthy:
                try:
                    await loop.run_in_executor(None, self._probe)
                    self.problem = None
                except OSError as exc:
                    self._fail(exc)
            if self._closing and not self._pending and (not self._sealed or not self.healthy):
                return

    def _probe(self) -> None:
        if self._fd is None or os.fstat(self._fd).st_nlink == 0:
            self._open()

    def _write(self, data: bytes) -> None:
        """One batch: reopen if the file was removed, write it all, fsync; cut it back on failure."""
        self._probe()
        fd = self._fd
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise

    async def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then close the file."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout_s)
            except asyncio.TimeoutError:
                self._task.cancel()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
