"""Reading request bodies of the reference API: bounded, strict, one reading only.

multipart/form-data is read with aiohttp's own parser. Parts that a reader
could decode in more than one way (a Content-Transfer-Encoding or
Content-Encoding, nested multipart) are refused, so whoever inspects the
same body (the gateway) reads exactly what we read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDictProxy

from gateway.reference.forms import MAX_TEXT, FieldError, strict_json

IDENTITY_ENCODINGS = ("", "7bit", "8bit", "binary")
JSON_LIMIT = 65536
MAX_PARTS = 256  # the gateway refuses the same


class BodyError(Exception):
    """The body as a whole cannot be read: 413, 415 or 400."""

    def __init__(self, status: int, slug: str, detail: str):
        self.status, self.slug, self.detail = status, slug, detail
        super().__init__(detail)


@dataclass
class Upload:
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class Form:
    fields: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, list[Upload]] = field(default_factory=dict)


def check_length(request: web.Request, limit: int) -> None:
    if request.content_length is not None and request.content_length > limit:
        raise BodyError(413, "body-too-large", f"the body is larger than {limit} bytes")


def _check_part_headers(headers: CIMultiDictProxy) -> None:
    cte = headers.get("Content-Transfer-Encoding", "").strip().lower()
    if cte not in IDENTITY_ENCODINGS:
        raise BodyError(400, "ambiguous-body", f"Content-Transfer-Encoding {cte!r} in a form part is not accepted")
    if "Content-Encoding" in headers:
        raise BodyError(400, "ambiguous-body", "Content-Encoding in a form part is not accepted")


async def read_multipart(request: web.Request, limit: int, file_fields: tuple[str, ...]) -> Form:
    """All parts of a multipart/form-data body; `file_fields` are kept as bytes, the rest as text."""
    if request.content_type != "multipart/form-data":
        raise BodyError(415, "unsupported-media-type", "the body must be multipart/form-data")
    check_length(request, limit)
    form = Form()
    parts = 0
    try:
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                break
            parts += 1
            if parts > MAX_PARTS:
                raise BodyError(400, "malformed-body", f"the form has more than {MAX_PARTS} parts")
            if not isinstance(part, BodyPartReader):
                raise BodyError(400, "ambiguous-body", "nested multipart parts are not accepted")
            _check_part_headers(part.headers)
            if part.name is None:
                raise BodyError(400, "malformed-body", "a form part has no name")
            cap = limit if part.name in file_fields else MAX_TEXT * 4
            data = bytearray()
            while chunk := await part.read_chunk():
                data += chunk
                if request.content.total_bytes > limit:
                    raise BodyError(413, "body-too-large", f"the body is larger than {limit} bytes")
                if len(data) > cap:
                    raise FieldError(part.name, "is too long")
            if part.name in file_fields:
                form.files.setdefault(part.name, []).append(
                    Upload(part.filename, part.headers.get("Content-Type"), bytes(data))
                )
            else:
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    raise FieldError(part.name, "is not UTF-8 text") from None
                form.fields.setdefault(part.name, []).append(text)
    except (BodyError, FieldError):
        raise
    except (ValueError, AssertionError, RuntimeError, KeyError, HttpProcessingError) as exc:
        raise BodyError(400, "malformed-body", f"the multipart body is malformed ({type(exc).__name__})") from None
    return form


async def _read_small(request: web.Request, limit: int) -> bytes:
    check_length(request, limit)
    data = b""
    while len(data) <= limit and (chunk := await request.content.read(limit + 1 - len(data))):
        data += chunk
    if len(data) > limit:
        raise BodyError(413, "body-too-large", f"the body is larger than {limit} bytes")
    return data


async def read_urlencoded(request: web.Request, limit: int = JSON_LIMIT) -> dict[str, list[str]]:
    """A small application/x-www-form-urlencoded body, every name with all its values."""
    data = await _read_small(request, limit)
    try:
        pairs = parse_qsl(data.decode("ascii"), keep_blank_values=True, strict_parsing=bool(data),
                          encoding="utf-8", errors="strict", max_num_fields=32)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BodyError(400, "malformed-body", f"the form body is malformed ({type(exc).__name__})") from None
    fields: dict[str, list[str]] = {}
    for name, value in pairs:
        fields.setdefault(name, []).append(value)
    return fields


async def read_json_object(request: web.Request, limit: int = JSON_LIMIT) -> dict:
    """A small JSON object body, read strictly (no duplicate keys)."""
    data = await _read_small(request, limit)
    try:
        value = strict_json(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BodyError(400, "malformed-body", f"the body is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BodyError(400, "malformed-body", "the body must be a JSON object")
    return value
