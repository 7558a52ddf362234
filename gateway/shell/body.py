"""Bounded reading of request bodies, and the fields the policy needs from them.

The body is spooled (memory up to a small threshold, then a temporary file)
exactly as it arrived, so the upstream receives it byte for byte. The fields
are read back out of the spool with aiohttp's own multipart parser, the same
parser the reference API uses, so both read one body one way. What could be
read two ways (a Content-Transfer-Encoding or Content-Encoding on a part,
nested multipart, repeated fields, JSON with duplicate keys) is refused.
"""

from __future__ import annotations

import asyncio
import tempfile
from typing import Any, AsyncIterator
from urllib.parse import parse_qsl

from aiohttp import BodyPartReader, MultipartReader
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from gateway.core.errors import Reason, Refusal
from gateway.core.strictjson import strict_json

MEMORY_THRESHOLD = 64 * 1024   # a body in memory at most; past it, a temporary file (slow uploaders stay cheap)
MAX_PARTS = 256            # the vendor's form needs at most 50 signers and a few fields
MAX_LINE = 2 ** 17         # a part header line longer than this is refused (as the upstream's reader does)
YIELD_EVERY = 64           # parsing gives the event loop a turn every this many reads
CHUNK = 64 * 1024
IDENTITY_ENCODINGS = ("", "7bit", "8bit", "binary")
# What aiohttp's multipart parser raises for a body it cannot read.
MALFORMED = (ValueError, AssertionError, RuntimeError, KeyError, HttpProcessingError)
MAX_FIELD_BYTES = 64 * 1024


def refuse(status: int, detail: str) -> Refusal:
    """The body cannot be inspected or is too large: 400, 413 or 415, never forwarded."""
    return Refusal(status, Reason.BODY_TOO_LARGE if status == 413 else Reason.BAD_BODY, detail)


class Spool:
    """The request body as received, bounded by `limit` bytes."""

    def __init__(self, limit: int):
        self.limit = limit
        self.size = 0
        self.file = tempfile.SpooledTemporaryFile(max_size=MEMORY_THRESHOLD)

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise refuse(413, f"the body is larger than {self.limit} bytes")
        self.file.write(chunk)

    async def fill(self, chunks: AsyncIterator[bytes]) -> "Spool":
        async for chunk in chunks:
            self.write(chunk)
        self.file.seek(0)
        return self

    async def chunks(self) -> AsyncIterator[bytes]:
        self.file.seek(0)
        while chunk := self.file.read(CHUNK):
            yield chunk

    def read_all(self) -> bytes:
        self.file.seek(0)
        return self.file.read()

    def close(self) -> None:
        self.file.close()


class SpoolStream:
    """The subset of aiohttp's StreamReader that MultipartReader uses, over a spool."""

    def __init__(self, spool: Spool):
        self._file = spool.file
        self._file.seek(0)
        self._pushed = b""
        self._eof = False

    def _take(self, n: int) -> bytes:
        data, self._pushed = self._pushed[:n], self._pushed[n:]
        if len(data) < n:
            data += self._file.read(n - len(data))
        if not data or (not self._pushed and self._file.tell() >= _size(self._file)):
            self._eof = not self._pushed and self._file.tell() >= _size(self._file)
        return data

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            data, self._pushed = self._pushed + self._file.read(), b""
            self._eof = True
            return data
        return self._take(n)

    async def readline(self, *, max_line_length: int | None = MAX_LINE) -> bytes:
        max_line_length = max_line_length or MAX_LINE
        line = bytearray()
        while True:
            chunk = self._take(CHUNK)
            if not chunk:
                return bytes(line)
            cut = chunk.find(b"\n")
            if cut >= 0:
                line += chunk[: cut + 1]
                self.unread_data(chunk[cut + 1:])
                if max_line_length and len(line) > max_line_length:
                    raise ValueError("line too long")
                return bytes(line)
            line += chunk
            if max_line_length and len(line) > max_line_length:
                raise ValueError("line too long")

    def at_eof(self) -> bool:
        return self._eof and not self._pushed

    def unread_data(self, data: bytes) -> None:
        if data:
            self._pushed = data + self._pushed
            self._eof = False


def _size(f) -> int:
    here = f.tell()
    end = f.seek(0, 2)
    f.seek(here)
    return end


def _check_part(part: Any) -> BodyPartReader:
    if not isinstance(part, BodyPartReader):
        raise refuse(400, "nested multipart parts are not accepted")
    cte = part.headers.get("Content-Transfer-Encoding", "").strip().lower()
    if cte not in IDENTITY_ENCODINGS:
        raise refuse(400, f"Content-Transfer-Encoding {cte!r} in a form part is not accepted")
    if "Content-Encoding" in part.headers:
        raise refuse(400, "Content-Encoding in a form part is not accepted")
    if part.name is None:
        raise refuse(400, "a form part has no name")
    return part


async def form_fields(spool: Spool, content_type: str, wanted: tuple[str, ...]) -> dict[str, list[str | Exception]]:
    """The text of every part named in `wanted` (UTF-8; an Exception where it is not)."""
    fields: dict[str, list[str | Exception]] = {}
    reads = parts = 0
    try:
        reader = MultipartReader(CIMultiDict({"Content-Type": content_type}), SpoolStream(spool))
        while (part := await reader.next()) is not None:
            part = _check_part(part)
            parts += 1
            if parts > MAX_PARTS:
                raise refuse(400, f"the form has more than {MAX_PARTS} parts")
            keep = part.name in wanted
            data = bytearray()
            while chunk := await part.read_chunk(CHUNK):
                reads += 1
                if reads % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # a large body is parsed in slices: the loop stays responsive
                if keep:
                    data += chunk
                    if len(data) > MAX_FIELD_BYTES:
                        raise refuse(400, f"{part.name}: is too long")
            if keep:
                try:
                    fields.setdefault(part.name, []).append(data.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    fields.setdefault(part.name, []).append(exc)
    except Refusal:
        raise
    except MALFORMED as exc:
        raise refuse(400, f"the multipart body is malformed ({type(exc).__name__})") from None
    return fields


async def anonymize_fields(spool: Spool, content_type: str, mimetype: str) -> dict[str, list[Any]]:
    """POST /anonymize as multipart, urlencoded or JSON, read as the reference API reads it."""
    names = ("internalId", "externalId", "ldapSearch")
    if mimetype == "multipart/form-data":
        fields = await form_fields(spool, content_type, names)
        all_names = await _part_names(spool, content_type)
        for name in all_names - set(names):
            fields.setdefault(name, []).append("")
        return fields
    data = spool.read_all()
    if mimetype == "application/x-www-form-urlencoded":
        try:
            pairs = parse_qsl(data.decode("ascii"), keep_blank_values=True, strict_parsing=bool(data),
                              encoding="utf-8", errors="strict", max_num_fields=32)
        except (UnicodeDecodeError, ValueError):
            raise refuse(400, "the form body is malformed") from None
        fields: dict[str, list[Any]] = {}
        for name, value in pairs:
            fields.setdefault(name, []).append(value)
        return fields
    if mimetype == "application/json":
        try:
            value = strict_json(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise refuse(400, "the body is not valid JSON") from None
        if not isinstance(value, dict):
            raise refuse(400, "the body must be a JSON object")
        return {k: [v] for k, v in value.items()}
    raise refuse(415, "the body must be multipart/form-data, application/x-www-form-urlencoded or JSON")


async def _part_names(spool: Spool, content_type: str) -> set[str]:
    names: set[str] = set()
    parts = 0
    try:
        reader = MultipartReader(CIMultiDict({"Content-Type": content_type}), SpoolStream(spool))
        while (part := await reader.next()) is not None:
            names.add(_check_part(part).name)
            parts += 1
            if parts > MAX_PARTS:
                raise refuse(400, f"the form has more than {MAX_PARTS} parts")
            await part.release()
    except MALFORMED as exc:
        raise refuse(400, f"the multipart body is malformed ({type(exc).__name__})") from None
    return names
