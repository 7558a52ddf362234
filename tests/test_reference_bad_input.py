"""Bad input of every kind: a clear 4xx problem naming the field, and nothing stored changes."""

from __future__ import annotations

import asyncio

import pytest

from conftest import SOLICITOR, create_order, order_form
from gateway.reference.documents import sample_pdf
from test_reference_api import db_counts

GUID = "5d7c2010-f461-4ceb-b66c-d6ef2a9a2802"


async def assert_problem(resp, status: int, field: str | None = None) -> dict:
    body = await resp.json(content_type=None)
    assert resp.status == status, body
    assert resp.content_type == "application/problem+json"
    assert set(body) >= {"type", "title", "status", "detail", "request_id"}
    assert body["status"] == status and body["request_id"] == resp.headers["X-Request-ID"]
    assert "Traceback" not in body["detail"]
    if field:
        assert body.get("field") == field and field in body["detail"]
    return body


@pytest.fixture
async def existing(ref, ref_settings):
    """One stored order, and the row counts every refused request must leave as they are."""
    order_id = await create_order(ref)
    counts = db_counts(ref_settings)
    yield order_id
    assert db_counts(ref_settings) == counts


ENCRYPTED_PDF_MARK = b"/Encrypt"


@pytest.mark.parametrize("overrides, field", [
    ({"title": None}, "title"),
    ({"title": ["one", "two"]}, "title"),
    ({"dueDate": "24/12/2099"}, "dueDate"),
    ({"dueDate": "2099-13-01T00:00:00"}, "dueDate"),
    ({"dueDate": "2024-12-24T00:00:00"}, "dueDate"),
    ({"solicitor": None}, "solicitor"),
    ({"solicitor": [SOLICITOR, SOLICITOR]}, "solicitor"),
    ({"solicitor": "{'source': 'INTERNAL'}"}, "solicitor"),
    ({"solicitor": '{"source":"INTERNAL","identifier":"sAMAccountName=nobody"}'}, "solicitor"),
    ({"signers": None}, "signers"),
    ({"signers": "[]"}, "signers"),
    ({"upload": None}, "upload"),
    ({"upload": [sample_pdf(), sample_pdf()]}, "upload"),
    ({"upload": b""}, "upload"),
    ({"upload": b"GIF89a not a pdf"}, "upload"),
    ({"upload": b"%PDF-1.7\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF"}, "upload"),
    ({"linkType": "2"}, "linkType"),
    ({"linkType": "one"}, "linkType"),
    ({"option": "notifyAllSigners"}, "option"),
    ({"tags": "{"}, "tags"),
    ({"extra": "x"}, "extra"),
    ({"title": "x" * 5000}, "title"),
])
async def test_bad_create_fields(ref, existing, overrides, field):
    await assert_problem(await ref.post("/orders", data=order_form(**overrides)), 400, field)


async def test_text_field_that_is_not_utf8(ref, existing):
    form = order_form(title=None)
    form.add_field("title", b"\xff\xfe", filename="title.txt", content_type="text/plain")
    resp = await ref.post("/orders", data=form)
    await assert_problem(resp, 400, "title")


async def test_create_needs_multipart(ref, existing):
    resp = await ref.post("/orders", data={"title": "x"})
    await assert_problem(resp, 415)
    resp = await ref.post("/orders", json={"title": "x"})
    await assert_problem(resp, 415)


async def test_huge_body_is_413(ref, existing):
    resp = await ref.post("/orders", data=order_form(upload=sample_pdf(3 * 1024 * 1024)))
    await assert_problem(resp, 413)


async def test_huge_chunked_body_is_413(ref, existing):
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"upload\"; filename=\"a.pdf\"\r\n\r\n").encode()

    async def body():
        yield head
        for _ in range(40):
            yield b"%" * 100_000

    resp = await ref.post("/orders", data=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    await assert_problem(resp, 413)


async def test_transfer_encoded_part_is_refused(ref, existing):
    boundary = "xyz"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"title\"\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\nQSB0aXRsZQ==\r\n"
        f"--{boundary}--\r\n"
    ).encode()
    resp = await ref.post("/orders", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    await assert_problem(resp, 400)


async def test_unterminated_multipart_is_400(ref, existing):
    body = b"--xyz\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nA title with no end"
    resp = await ref.post("/orders", data=body, headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert 400 <= resp.status < 500
    assert resp.content_type == "application/problem+json"


async def test_nameless_part_is_400(ref, existing):
    body = b"--xyz\r\nContent-Disposition: form-data\r\n\r\nx\r\n--xyz--\r\n"
    resp = await ref.post("/orders", data=body, headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    await assert_problem(resp, 400)


@pytest.mark.parametrize("path, status", [
    (f"/orders/{GUID}", 404),
    (f"/orders/{GUID}/state", 404),
    (f"/orders/{GUID}/document", 404),
    ("/orders/not-a-guid", 400),
    ("/orders/5d7c2010f4614cebb66cd6ef2a9a2802/state", 400),
    ("/orders/{5d7c2010-f461-4ceb-b66c-d6ef2a9a2802}", 404),
    ("/nowhere", 404),
])
async def test_unknown_or_malformed_order(ref, existing, path, status):
    await assert_problem(await ref.get(path), status)


async def test_unknown_order_for_every_write(ref, existing):
    await assert_problem(await ref.delete(f"/orders/{GUID}"), 404)
    for action in ("signers/0/sign", "signers/0/reject", "cancel"):
        await assert_problem(await ref.post(f"/workflow/orders/{GUID}/{action}"), 404)


async def test_wrong_method_is_a_problem(ref, existing):
    await assert_problem(await ref.put(f"/orders/{existing}"), 405)


@pytest.mark.parametrize("kwargs, status", [
    ({"json": {}}, 400),
    ({"json": {"internalId": "x", "externalId": "EXTERNAL:1"}}, 400),
    ({"json": ["internalId"]}, 400),
    ({"data": b'{"internalId": "a", "internalId": "b"}', "headers": {"Content-Type": "application/json"}}, 400),
    ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400),
    ({"data": "externalId=EXTERNAL:1&externalId=EXTERNAL:2",
      "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 400),
    ({"data": b"x" * 70000, "headers": {"Content-Type": "application/json"}}, 413),
    ({"data": b"<xml/>", "headers": {"Content-Type": "application/xml"}}, 415),
])
async def test_bad_anonymize(ref, existing, kwargs, status):
    await assert_problem(await ref.post("/anonymize", **kwargs), status)


async def test_concurrent_creates_all_land(ref, ref_settings):
    ids = await asyncio.gather(*(create_order(ref) for _ in range(10)))
    assert len(set(ids)) == 10
    assert db_counts(ref_settings)["orders"] == 10
