"""The audit log: one chained JSON line for every request that reached HTTP.

Each line's `hash` covers the line's canonical form, which includes `prev`,
the hash of the line before it (SHA-256, or HMAC-SHA256 when a key is set).
Changing, removing or moving a line breaks the chain at that line, and
`verify` names it. The canonical form is the one used both to write and to
verify: the record without `hash`, as compact JSON with sorted keys.

Fields listed in `audit.redact` (dotted paths such as solicitor.identifier)
are written as a keyed hash, so one person can be followed across lines
without being named. This module is pure; audit_writer.py writes the lines.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

GENESIS = "0" * 64
REDACTED_PREFIX = "hmac-sha256:"


# ASCII only: any text a client sent (lone surrogates included) has one spelling, and no line can fail.
# One encoder kept: json.dumps with options builds a new JSONEncoder on every call (a fifth of the time).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def canonical(record: dict) -> bytes:
    return _CANONICAL.encode(record).encode("ascii")


def line_hash(body: bytes, key: bytes | None) -> str:
    if key:
        return hmac.new(key, body, hashlib.sha256).hexdigest()
    return hashlib.sha256(body).hexdigest()


def seal(record: dict, prev: str, key: bytes | None) -> tuple[bytes, str]:
    """The line to write (with its newline) and its hash, chained to `prev`."""
    sealed = {**record, "prev": prev}
    sealed.pop("hash", None)
    body = canonical(sealed)
    digest = line_hash(body, key)
    # the hash goes last rather than in key order: verify() reads the line as JSON, so the order of its
    # keys is free, and the canonical form is encoded once instead of twice
    return body[:-1] + b',"hash":"' + digest.encode("ascii") + b'"}\n', digest


def sealed_hash(line: bytes) -> str:
    """The hash of a line made by seal() (its last key), without parsing the line."""
    return line[line.rindex(b'"hash":"') + 8:-3].decode("ascii")


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int
    bad_line: int | None = None
    why: str = ""


TORN = ("torn tail: the last line has no end ({n} bytes), as a crash mid-write leaves it; "
        "`gateway serve` moves such bytes to <audit.path>.torn-<time> and records that on its next start")


def verify(lines: Iterable[bytes], key: bytes | None) -> VerifyResult:
    """Check a whole log; the first changed, removed, moved or torn line is reported (1-based)."""
    prev = GENESIS
    count = 0
    for number, raw in enumerate(lines, start=1):
        if not raw.endswith(b"\n"):
            return VerifyResult(False, count, number, TORN.format(n=len(raw)))
        try:
            record = json.loads(raw)
        except ValueError:
            return VerifyResult(False, count, number, "not a JSON record")
        if not isinstance(record, dict) or not isinstance(record.get("hash"), str):
            return VerifyResult(False, count, number, "not an audit record")
        claimed = record.pop("hash")
        if line_hash(canonical(record), key) != claimed:
            return VerifyResult(False, count, number, "the line was changed (its hash does not match)")
        if record.get("prev") != prev:
            return VerifyResult(False, count, number,
                                "the chain is broken before this line (a line was removed or moved)")
        prev = claimed
        count += 1
    return VerifyResult(True, count)


def verify_file(lines: Iterable[bytes], key: bytes | None) -> tuple[VerifyResult, dict | None, str | None]:
    """verify() of one file, with its first record (parsed) and the hash of its last good line."""
    first: dict | None = None
    last: str | None = None

    def watched():
        nonlocal first, last
        for raw in lines:
            if first is None:
                try:
                    first = json.loads(raw)
                except ValueError:
                    first = {}
            yield raw
            last = json.loads(raw)["hash"]   # reached only once verify() accepted the line

    result = verify(watched(), key)
    return result, (first if isinstance(first, dict) else {}), last


def chain_link(before: tuple[str, str | None], first: dict | None) -> str:
    """How a file continues the one given before it, as a note for its OK line ("" when it says nothing).

    A file the writer started because the log was removed, renamed (rotated) or replaced while the
    gateway ran begins a chain of its own (its first `prev` is GENESIS) with an `event: "reopened"`
    record whose `previous_hash` is the last hash of the old file. A file started by a gateway that
    was restarted after the rotation has no such record: nothing links it to the file before.
    """
    name, last = before
    if not first or first.get("event") != "reopened":
        return ""
    if last is not None and first.get("previous_hash") == last:
        return f" (continues {name})"
    return (f" (its reopened record follows a hash that is not the end of {name}: "
            "a file between them is missing, or they are not one rotated series)")


def last_hash(tail: bytes) -> str | None:
    """The hash of the last complete record in the end of a log, to continue its chain."""
    for raw in reversed(tail.split(b"\n")[:-1]):
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("hash"), str):
            return record["hash"]
    return None


def recovered(torn: bytes, torn_file: str, now: float) -> dict:
    """The record that puts a torn tail moved aside on record, so the loss is in the chain."""
    return {
        "ts": timestamp(now), "event": "recovered", "torn_file": torn_file, "torn_bytes": len(torn),
        "torn_sha256": hashlib.sha256(torn).hexdigest(),
        "reason": "the log ended in an incomplete line (a crash mid-write); its bytes were moved aside",
    }


def completed(ex: Any, now: float, duration_s: float) -> dict:
    """The second line of a streamed answer: whether its last byte left, once it did or the transfer was cut."""
    return {
        "ts": timestamp(now), "event": "completed", "request_id": ex.request_id, "client": ex.client,
        "status": ex.status, "complete": bool(ex.complete), "bytes_out": ex.bytes_out,
        "duration_ms": round(duration_s * 1000, 3), "reason": ex.reason,
    }


class Redactor:
    """Replaces the listed dotted fields with a keyed hash of their value, and that value in the prose.

    A value is often repeated in `reason` (a refusal names the solicitor it refused), so
    once a field is redacted every spelling of its value there (as text, as JSON, as
    Python renders it, and each string inside it) is replaced by the same pseudonym.
    Only prose is rewritten: the fixed fields (decision, operation, client, ...) stay as
    they are, whatever a client chose its values to be.
    """

    PROSE = ("reason",)

    KEPT = 4096   # pseudonyms remembered (the same solicitor comes again and again); dropped whole when full

    def __init__(self, fields: Iterable[str], key: bytes):
        self.paths = [tuple(f.split(".")) for f in fields]
        self.key = key
        self._known: dict[str, str] = {}

    def pseudonym(self, value: Any) -> str:
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        known = self._known.get(text)
        if known is None:
            if len(self._known) >= self.KEPT:
                self._known.clear()
            known = self._known[text] = (
                REDACTED_PREFIX + hmac.new(self.key, text.encode("utf-8"), hashlib.sha256).hexdigest()[:32])
        return known

    def apply(self, record: dict) -> dict:
        hidden: dict[str, str] = {}
        for path in self.paths:
            node = record
            for part in path[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and node.get(path[-1]) is not None:
                value = node[path[-1]]
                node[path[-1]] = pseudonym = self.pseudonym(value)
                for text in _spellings(value):
                    hidden.setdefault(text, pseudonym)
        if hidden:
            order = sorted(hidden, key=len, reverse=True)   # a value containing another is replaced whole
            for key in self.PROSE:
                text = record.get(key)
                if isinstance(text, str):
                    for clear in order:
                        text = text.replace(clear, hidden[clear])
                    record[key] = text
        return record


def _spellings(value: Any) -> set[str]:
    """Every way a value may have been written into prose: itself, its JSON, its Python form, its strings."""
    if isinstance(value, str):
        return {value} if value else set()
    out = {json.dumps(value, sort_keys=True), json.dumps(value), str(value)}
    if isinstance(value, dict):
        for k, v in value.items():
            out |= _spellings(k) | _spellings(v)
    elif isinstance(value, list):
        for v in value:
            out |= _spellings(v)
    return {s for s in out if s}


_second: tuple[int | None, str] = (None, "")   # the last whole second formatted, and its text (one tuple:
                                               # the writer thread formats timestamps too)


def timestamp(ts: float) -> str:
    """ISO 8601 UTC to the millisecond, as datetime's isoformat gives it (rounded to the microsecond first)."""
    whole = math.floor(ts)
    micro = round((ts - whole) * 1e6)
    if micro >= 1_000_000:
        whole, micro = whole + 1, micro - 1_000_000
    global _second
    second, text = _second
    if whole != second:
        text = datetime.fromtimestamp(whole, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        _second = (whole, text)
    return f"{text}.{micro // 1000:03d}Z"


def record_of(ex: Any, now: float, duration_s: float) -> dict:
    """The audit record of one Exchange (see proxy.py), before redaction and sealing."""
    record = {
        "ts": timestamp(now),
        "request_id": ex.request_id,
        "client": ex.client,
        "cert": ex.identity.audit_fields() if ex.identity is not None else None,
        "remote": ex.remote,
        "method": ex.method,
        "path": ex.path,
        "operation": ex.operation,
        "order_id": ex.order_id,
        "solicitor": dict(ex.solicitor) if ex.solicitor else None,
        "decision": ex.decision,
        "reason": ex.reason,
        "code": ex.code,             # the fixed reason code of a denial (the metrics' reason label), else None
        "status": ex.status,
        "complete": ex.complete,     # None: streamed, see the "completed" line of this request_id
        "bytes_in": ex.bytes_in,
        "bytes_out": ex.bytes_out,
        "duration_ms": round(duration_s * 1000, 3),
    }
    if ex.would_deny:
        record["would_deny"] = ex.would_deny
    if ex.revocation:
        record["revocation"] = ex.revocation
    return record
