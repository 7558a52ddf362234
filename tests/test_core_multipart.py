"""gateway.shell.body: Spool, SpoolStream (read as aiohttp reads), form_fields, anonymize_fields."""

from __future__ import annotations

import asyncio
import random
from unittest.mock import Mock

import aiohttp
import pytest
from aiohttp import BodyPartReader, MultipartReader
from aiohttp.http_exceptions import BadHttpMessage
from hypothesis import given, settings, strategies as st
from multidict import CIMultiDict

from gateway.core.errors import Refusal
from gateway.core.strictjson import json_value
from gateway.shell.body import MAX_FIELD_BYTES, MEMORY_THRESHOLD, Spool, anonymize_fields, form_fields

FAILED = "<both refuse>"
BAD_UTF8 = "<not utf-8>"
B = "XyZ-b0undary"
CT = f"multipart/form-data; boundary={B}"


def part(name: str | None, value: bytes, *, extra: str = "", nl: bytes = b"\r\n", b: str = B) -> bytes:
    disp = 'Content-Disposition: form-data' + (f'; name="{name}"' if name is not None else "")
    return b"--" + b.encode() + nl + (disp + extra).encode() + nl + nl + value + nl


def form(*parts: bytes, close: bytes = b"\r\n", b: str = B) -> bytes:
    return b"".join(parts) + b"--" + b.encode() + b"--" + close


async def via_aiohttp(body: bytes, content_type: str, wanted, rnd: random.Random, max_chunk: int = 4096):
    stream = aiohttp.StreamReader(protocol=Mock(_reading_paused=False), limit=2**16, loop=asyncio.get_running_loop())
    i = 0
    while i < len(body):
        n = rnd.randint(1, max_chunk)
        stream.feed_data(body[i:i + n])
        i += n
    stream.feed_eof()
    fields: dict[str, list] = {}
    try:
        reader = MultipartReader(CIMultiDict({"Content-Type": content_type}), stream)
        while (p := await reader.next()) is not None:
            # the gateway's own rules on top of aiohttp: a plain, named, identity-encoded part
            if not isinstance(p, BodyPartReader) or p.name is None or "Content-Encoding" in p.headers:
                return FAILED
            if p.headers.get("Content-Transfer-Encoding", "").strip().lower() not in ("", "7bit", "8bit", "binary"):
                return FAILED
            data = bytes(await p.read())
            if p.name in wanted:
                if len(data) > MAX_FIELD_BYTES:
                    return FAILED
                try:
                    fields.setdefault(p.name, []).append(data.decode("utf-8"))
                except UnicodeDecodeError:
                    fields.setdefault(p.name, []).append(BAD_UTF8)
    except Exception:
        return FAILED
    return fields


def spool_of(body: bytes, limit: int = 10**9) -> Spool:
    spool = Spool(limit)
    spool.write(body)
    return spool


async def via_spool(body: bytes, content_type: str, wanted):
    try:
        fields = await form_fields(spool_of(body), content_type, wanted)
    except Refusal as exc:
        assert exc.status == 400
        return FAILED
    except BadHttpMessage:  # refused, but not as Refusal: see test_malformed_part_headers_are_400
        return FAILED
    return {k: [BAD_UTF8 if isinstance(v, Exception) else v for v in vs] for k, vs in fields.items()}


SOL = b'{"source":"INTERNAL","identifier":"sAMAccountName=anna"}'
PDF = b"%PDF-1.4\r\n-- " + B.encode() + b"x\r\n" + B.encode() + b"\x00\xff" * 50
CASES = [
    ("normal", CT, form(part("solicitor", SOL), part("title", b"T"),
                        part("upload", PDF, extra='; filename="a.pdf"\r\nContent-Type: application/pdf')),
     {"solicitor": [SOL.decode()], "title": ["T"]}),
    ("preamble-epilogue", CT, b"preamble\r\n--not\r\n" + form(part("title", b"T"), close=b"\r\nepilogue\r\n")
     + part("title", b"SMUGGLED") + form(), {"title": ["T"]}),
    ("lookalikes", CT, form(part("title", b"a\r\n--\r\n--XyZ\r\n-- " + B.encode() + b"\r\n--" + B[:-1].encode()
                                 + b"\r\n" + B.encode() + b"\n--" + B.encode())),
     {"title": ["a\r\n--\r\n--XyZ\r\n-- " + B + "\r\n--" + B[:-1] + "\r\n" + B + "\n--" + B]}),
    ("boundary-with-suffix", CT, form(part("title", b"a\r\n--" + B.encode() + b"x\r\nmore")), FAILED),
    ("lf-only", CT, form(part("title", b"T", nl=b"\n"), close=b"\n"), FAILED),
    ("quoted-boundary", 'multipart/form-data; boundary="a:b= c"',
     form(part("title", b"q", b="a:b= c"), b="a:b= c"), {"title": ["q"]}),
    ("unterminated", CT, part("title", b"T")[:-2], FAILED),
    ("unterminated-open-boundary", CT, part("title", b"T") + b"--" + B.encode() + b"\r\n", FAILED),
    ("no-final-crlf", CT, form(part("title", b"T"), close=b""), {"title": ["T"]}),
    ("empty-form", CT, form(), {}),
    ("empty-body", CT, b"", FAILED),
    ("repeated-empty-and-bad-utf8", CT, form(part("title", b""), part("title", b"\xff\xfe"), part("title", b"x")),
     {"title": ["", BAD_UTF8, "x"]}),
    ("header-line-at-limit", CT, form(part("title", b"L", extra="; x=" + "q" * 8140)), {"title": ["L"]}),
    ("header-line-over-limit", CT, form(part("title", b"L", extra="; x=" + "q" * 8141)), FAILED),
    ("big-file-on-disk", CT, form(part("upload", b"\r\n-" * (MEMORY_THRESHOLD // 2), extra='; filename="f"'),
                                  part("title", b"after")), {"title": ["after"]}),
    ("mixed-with-length", f"multipart/mixed; boundary={B}",
     form(part("title", b"\r\n--" + B.encode() + b"--\r\n", extra="\r\nContent-Length: 20")), FAILED),
]


@pytest.mark.parametrize("name, content_type, body, expected", CASES, ids=[c[0] for c in CASES])
async def test_spool_stream_reads_as_aiohttp_reads(name, content_type, body, expected):
    wanted = ("solicitor", "title")
    got = await via_spool(body, content_type, wanted)
    for seed in range(4):
        ref = await via_aiohttp(body, content_type, wanted, random.Random(seed), max_chunk=[1, 7, 100, 70000][seed])
        assert got == ref, (name, seed)
    if name != "mixed-with-length":
        assert got == expected


NEWLINES = st.sampled_from([b"\r\n", b"\n"])
TOKENS = ["a", "é", " ", "-", "--", "\r", "\n", "\r\n", "\r\n--", B, "--" + B, "\r\n--" + B, "\r\n--" + B + "--"]
VALUES = st.lists(st.sampled_from(TOKENS), max_size=12).map("".join)


@settings(max_examples=300, deadline=None, database=None)
@given(fields=st.lists(st.tuples(st.sampled_from(["a", "b", "upload"]), VALUES), max_size=4),
       nl=NEWLINES, close=st.sampled_from([b"\r\n", b"", b"\r\nepilogue", b"\n"]),
       preamble=st.sampled_from([b"", b"pre\r\n", b"--" + B.encode() + b"x\r\n"]),
       seed=st.integers(0, 2**32), max_chunk=st.sampled_from([1, 3, 17, 512, 100000]))
async def test_property_same_fields_as_aiohttp(fields, nl, close, preamble, seed, max_chunk):
    body = preamble + form(*(part(n, v.encode(), nl=nl) for n, v in fields), close=close)
    wanted = ("a", "b")
    got = await via_spool(body, CT, wanted)
    ref = await via_aiohttp(body, CT, wanted, random.Random(seed), max_chunk)
    assert got == ref


# -- Spool --------------------------------------------------------------------


async def test_spool_limit_and_round_trip():
    async def gen(chunks):
        for c in chunks:
            yield c

    spool = await Spool(10).fill(gen([b"0123", b"", b"456789"]))
    assert spool.size == 10 and spool.read_all() == b"0123456789"
    assert b"".join([c async for c in spool.chunks()]) == b"0123456789"
    with pytest.raises(Refusal) as info:
        await Spool(10).fill(gen([b"01234", b"56789", b"X"]))
    assert info.value.status == 413 and "10" in info.value.detail
    over = Spool(3)
    with pytest.raises(Refusal) as info:
        over.write(b"abcd")
    assert info.value.status == 413


# -- what form_fields refuses --------------------------------------------------


@pytest.mark.parametrize("body", [
    form(part("title", b"VA==", extra="\r\nContent-Transfer-Encoding: base64")),
    form(part("other", b"VA==", extra="\r\nContent-Transfer-Encoding: BASE64")),
    form(part("title", b"T", extra="\r\nContent-Transfer-Encoding: quoted-printable")),
    form(part("title", b"x", extra="\r\nContent-Encoding: gzip")),
    form(part("title", b"x", extra="\r\nContent-Encoding: identity")),
    form(b"--" + B.encode() + b'\r\nContent-Disposition: form-data; name="title"\r\n'
         b"Content-Type: multipart/mixed; boundary=inner\r\n\r\n" + form(part("title", b"x", b="inner"), b="inner")),
    form(part(None, b"x")), form(part("title", b"T"), part(None, b"x")),
    form(part("title", b"x" * (MAX_FIELD_BYTES + 1))), form(part("upload", b"", extra="; x=" + "q" * 8141)),
    form(part("title", b"x" * 1000), part("title", b"y" * MAX_FIELD_BYTES + b"z")),
])
async def test_form_fields_refuses(body):
    with pytest.raises(Refusal) as info:
        await form_fields(spool_of(body), CT, ("title",))
    assert info.value.status == 400


async def test_form_fields_accepts_identity_encodings_and_limits():
    body = form(part("title", b"x" * MAX_FIELD_BYTES, extra="\r\nContent-Transfer-Encoding: 8bit"),
                part("upload", b"y" * (MAX_FIELD_BYTES * 2), extra="\r\nContent-Transfer-Encoding: binary"))
    assert await form_fields(spool_of(body), CT, ("title",)) == {"title": ["x" * MAX_FIELD_BYTES]}


@pytest.mark.parametrize("body", [
    b"--" + B.encode() + b"\r\nContent-Disposition form-data\r\n\r\nx\r\n" + form(),
    b"--" + B.encode() + b"\r\n" + b"X: 1\r\n" * 200 + b"\r\nx\r\n" + form(),
    form(part("_charset_", b"utf-8"), part("title", b"x")),  # aiohttp reads the next boundary as a header
], ids=["no-colon", "too-many-headers", "charset-part"])
async def test_malformed_part_headers_are_400(body):
    with pytest.raises(Refusal) as info:
        await form_fields(spool_of(body), CT, ("title",))
    assert info.value.status == 400


# -- json_value ---------------------------------------------------------------


def test_json_value():
    assert json_value('{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}
    for text in ('{"a": 1, "a": 2}', '{"x": {"a": 1, "a": 1}}', "NaN", '{"a": Infinity}', "[-Infinity]",
                 "{", "", "[" * 100000):
        assert isinstance(json_value(text), Exception), text
    err = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad")
    assert json_value(err) is err


# -- anonymize_fields ---------------------------------------------------------

MP = "multipart/form-data"
URL = "application/x-www-form-urlencoded"


async def test_anonymize_fields_multipart_shows_unknown_names():
    body = form(part("internalId", b"abc"), part("sneaky", b"x"), part("upload", b"y", extra='; filename="f"'))
    assert await anonymize_fields(spool_of(body), CT, MP) == {"internalId": ["abc"], "sneaky": [""], "upload": [""]}
    assert await anonymize_fields(spool_of(form(part("externalId", b"E:1"), part("externalId", b"E:2"))), CT, MP) \
        == {"externalId": ["E:1", "E:2"]}
    with pytest.raises(Refusal):
        await anonymize_fields(spool_of(form(part(None, b"x"))), CT, MP)


@pytest.mark.parametrize("body, expected", [
    (b"internalId=abc", {"internalId": ["abc"]}),
    (b"externalId=EXTERNAL%3A19+8&externalId=x&other=", {"externalId": ["EXTERNAL:19 8", "x"], "other": [""]}),
    (b"ldapSearch=%C3%A9", {"ldapSearch": ["é"]}),
    (b"", {}),
])
async def test_anonymize_fields_urlencoded(body, expected):
    assert await anonymize_fields(spool_of(body), URL, URL) == expected


@pytest.mark.parametrize("body", [b"a=1&&b=2", b"novalue", b"a=1&", b"a=%FF", "a=é".encode(), b"\xff=1",
                                  b"&".join(b"f%d=1" % i for i in range(33))])
async def test_anonymize_fields_urlencoded_malformed(body):
    with pytest.raises(Refusal) as info:
        await anonymize_fields(spool_of(body), URL, URL)
    assert info.value.status == 400


async def test_anonymize_fields_json_and_other_types():
    assert await anonymize_fields(spool_of(b'{"internalId": "a", "x": 1}'), "application/json", "application/json") \
        == {"internalId": ["a"], "x": [1]}
    for body in (b"[1]", b'"s"', b"null", b'{"a": 1, "a": 2}', b'{"a": NaN}', b"\xff", b"{"):
        with pytest.raises(Refusal) as info:
            await anonymize_fields(spool_of(body), "application/json", "application/json")
        assert info.value.status == 400, body
    for mimetype in ("text/plain", "", "application/xml", "multipart/mixed"):
        with pytest.raises(Refusal) as info:
            await anonymize_fields(spool_of(b"internalId=a"), mimetype, mimetype)
        assert info.value.status == 415
