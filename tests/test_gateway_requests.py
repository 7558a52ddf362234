"""The front door over real mTLS: policies per operation, solicitors, path tricks, headers, bytes."""

from __future__ import annotations

import hashlib
import json

import aiohttp
import pytest

from gateway_harness import ORDER_CRM, ORDER_HR, session
from gateway.reference.documents import sample_pdf

HR_SOLICITOR = '{"source":"INTERNAL","identifier":"sAMAccountName=cborgstrom","attributes":{}}'
EXT_SOLICITOR = '{"source":"EXTERNAL","identifier":"198603052385"}'


def form(solicitors=(HR_SOLICITOR,), upload: bytes | None = None) -> aiohttp.FormData:
    f = aiohttp.FormData(default_to_multipart=True)
    f.add_field("title", "T")
    for s in solicitors:
        f.add_field("solicitor", s)
    f.add_field("signers", EXT_SOLICITOR)
    f.add_field("upload", upload if upload is not None else sample_pdf(), filename="a.pdf",
                content_type="application/pdf")
    return f


async def call(test_pki, client, method, url, **kwargs) -> tuple[int, dict | str, aiohttp.ClientResponse]:
    async with session(test_pki, test_pki.client(client)) as s:
        async with s.request(method, url, **kwargs) as resp:
            raw = await resp.read()
            body = json.loads(raw) if raw and resp.content_type.endswith("json") else raw.decode("latin-1")
            return resp.status, body, resp


# -- each operation, allowed and refused per policy ---------------------------------

@pytest.mark.parametrize("client, method, path, status", [
    ("hr-system", "GET", f"/orders/{ORDER_HR}", 200),
    ("hr-system", "GET", f"/orders/{ORDER_HR}/state", 200),
    ("hr-system", "GET", f"/orders/{ORDER_HR}/document", 200),
    ("hr-system", "DELETE", f"/orders/{ORDER_HR}", 200),
    ("crm", "GET", f"/orders/{ORDER_CRM}", 200),
    ("crm", "GET", f"/orders/{ORDER_CRM}/state", 200),
    ("crm", "GET", f"/orders/{ORDER_CRM}/document", 200),
    ("crm", "DELETE", f"/orders/{ORDER_CRM}", 403),            # crm may not delete
    ("lawyer", "GET", f"/orders/{ORDER_CRM}/state", 403),      # lawyer may only anonymize
])
async def test_order_operations_per_policy(gw, test_pki, recorder, client, method, path, status):
    got, body, resp = await call(test_pki, client, method, gw + path)
    assert got == status, body
    assert "X-Request-ID" in resp.headers
    if status == 200:
        assert recorder.forwarded() == [f"{method} {path}"]
    else:
        assert recorder.forwarded() == [] and resp.content_type == "application/problem+json"
        assert body["status"] == status and "not allowed" in body["detail"]


@pytest.mark.parametrize("client, order, method, suffix", [
    (client, order, method, suffix)
    for client, order in (("crm", ORDER_HR), ("hr-system", ORDER_CRM))
    for method, suffix in (("GET", ""), ("GET", "/state"), ("GET", "/document"), ("DELETE", ""))
    if not (client == "crm" and method == "DELETE")  # crm may not delete at all: 403 before any look-up
])
async def test_orders_of_other_solicitors_are_404(gw, test_pki, recorder, client, order, method, suffix):
    status, body, _ = await call(test_pki, client, method, f"{gw}/orders/{order}{suffix}")
    assert status == 404 and body["detail"] == "no such order for this client"
    assert recorder.forwarded() == []


async def test_unknown_order_is_404_without_forwarding(gw, test_pki, recorder):
    status, _, _ = await call(test_pki, "crm", "GET", f"{gw}/orders/44444444-4444-4444-8444-444444444444/state")
    assert status == 404 and recorder.forwarded() == []


def multipart_bytes(boundary: str, parts: list[tuple[str, bytes, str | None]], preamble: bytes = b"",
                    epilogue: bytes = b"") -> bytes:
    out = bytearray(preamble)
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return bytes(out + f"--{boundary}--\r\n".encode() + epilogue)


@pytest.mark.parametrize("preamble, epilogue", [(b"", b""), (b"a preamble\r\n", b"an epilogue\r\n")])
async def test_create_order_allowed_and_forwarded_byte_for_byte(gw, test_pki, recorder, preamble, epilogue):
    boundary = "----odd'boundary(1)"
    body = multipart_bytes(boundary, [
        ("title", "Ünïcode title".encode(), None),
        ("solicitor", HR_SOLICITOR.encode(), None),
        ("signers", EXT_SOLICITOR.encode(), None),
        ("upload", sample_pdf(150_000) + b"\r\n--not-the-boundary\r\n", "a.pdf"),
    ], preamble, epilogue)
    content_type = f'multipart/form-data; boundary="{boundary}"'
    got, text, resp = await call(test_pki, "hr-system", "POST", gw + "/orders", data=body,
                                 headers={"Content-Type": content_type})
    assert got == 200, text
    assert resp.headers["X-Body-SHA256"] == hashlib.sha256(body).hexdigest()
    (seen,) = recorder.seen
    assert (seen.method, seen.path, seen.body_length) == ("POST", "/orders", len(body))
    assert seen.body_sha256 == hashlib.sha256(body).hexdigest()
    headers = dict((k.lower(), v) for k, v in seen.headers)
    assert headers["content-type"] == content_type
    assert headers["content-length"] == str(len(body))
    assert "transfer-encoding" not in headers


async def test_chunked_create_is_forwarded_with_its_length(gw, test_pki, recorder):
    body = multipart_bytes("b", [("solicitor", HR_SOLICITOR.encode(), None), ("upload", sample_pdf(), "a.pdf")])

    async def chunks():
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    got, text, _ = await call(test_pki, "hr-system", "POST", gw + "/orders", data=chunks(),
                              headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert got == 200, text
    assert recorder.seen[0].body_sha256 == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("client, solicitors, status, detail", [
    ("crm", (HR_SOLICITOR,), 403, "is not one of client crm's solicitors"),
    ("hr-system", (EXT_SOLICITOR,), 403, "is not one of client hr-system's solicitors"),
    ("hr-system", (), 400, "solicitor: is missing"),
    ("hr-system", (HR_SOLICITOR, HR_SOLICITOR), 400, "repeated"),
    ("hr-system", (HR_SOLICITOR, EXT_SOLICITOR), 400, "repeated"),
    ("hr-system", ("{not json",), 400, "not valid JSON"),
    ("hr-system", ('["INTERNAL", "sAMAccountName=x"]',), 400, "must be a JSON object"),
    ("hr-system", ('{"source":"EXTERNAL","identifier":"1","source":"INTERNAL","identifier":"sAMAccountName=x"}',),
     400, "not valid JSON"),
    ("hr-system", ('{"source":"INTERNAL","identifier":"SAMACCOUNTNAME=x"}',), 403, "not one of"),
    ("crm", ('{"source":"EXTERNAL","identifier":198603052385}',), 403, "not one of"),
])
async def test_create_order_solicitor_rules(gw, test_pki, recorder, client, solicitors, status, detail):
    got, body, _ = await call(test_pki, client, "POST", gw + "/orders", data=form(solicitors))
    assert got == status and detail in body["detail"], body
    assert recorder.seen == []


async def test_create_order_needs_multipart(gw, test_pki, recorder):
    for kwargs in ({"json": {"solicitor": json.loads(HR_SOLICITOR)}},
                   {"data": {"solicitor": HR_SOLICITOR}},
                   {"data": b"x", "headers": {"Content-Type": "multipart/form-data"}}):
        got, body, _ = await call(test_pki, "hr-system", "POST", gw + "/orders", **kwargs)
        assert got == 415, body
    assert recorder.seen == []


async def test_create_order_with_transfer_encoded_solicitor_is_refused(gw, test_pki, recorder):
    import base64

    body = (
        "--b\r\nContent-Disposition: form-data; name=\"solicitor\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.b64encode(HR_SOLICITOR.encode()).decode() + "\r\n--b--\r\n"
    ).encode()
    got, detail, _ = await call(test_pki, "hr-system", "POST", gw + "/orders", data=body,
                                headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert got == 400 and "Content-Transfer-Encoding" in detail["detail"]
    assert recorder.seen == []


async def test_compressed_create_body_is_refused(gw, test_pki, recorder):
    got, _, _ = await call(test_pki, "hr-system", "POST", gw + "/orders", data=form(),
                           headers={"Content-Encoding": "gzip"})
    assert got == 415 and recorder.seen == []


async def test_upload_limits_are_413(gw, test_pki, recorder):
    # crm's max_upload_bytes is 200 000; the config's max_body_bytes is 1 000 000.
    got, body, _ = await call(test_pki, "crm", "POST", gw + "/orders",
                              data=form((EXT_SOLICITOR,), upload=sample_pdf(250_000)))
    assert got == 413, body
    got, body, _ = await call(test_pki, "hr-system", "POST", gw + "/orders", data=form(upload=sample_pdf(1_100_000)))
    assert got == 413, body
    got, body, _ = await call(test_pki, "crm", "POST", gw + "/orders",
                              data=form((EXT_SOLICITOR,), upload=sample_pdf(150_000)))
    assert got == 200, body
    assert recorder.forwarded() == ["POST /orders"]


# -- anonymize ---------------------------------------------------------------------

@pytest.mark.parametrize("client, kwargs, status", [
    ("hr-system", {"json": {"internalId": "256FEDCB-CC59-435B-B45B-D915F7C7A04A"}}, 200),
    ("hr-system", {"data": {"externalId": "INTERNAL:jane.doe"}}, 200),
    ("lawyer", {"data": {"externalId": "EXTERNAL:198603052385"}}, 200),
    ("lawyer", {"data": {"externalId": "EXTERNAL:200001011907"}}, 403),
    ("lawyer", {"json": {"internalId": "256FEDCB-CC59-435B-B45B-D915F7C7A04A"}}, 403),
    ("lawyer", {"json": {"ldapSearch": {"source": "EXTERNAL", "identifier": "198603052385"}}}, 403),
    ("crm", {"json": {"externalId": "EXTERNAL:198603052385"}}, 403),
    ("lawyer", {"json": {"externalId": "EXTERNAL:198603052385", "internalId": "x"}}, 400),
    ("lawyer", {"data": "externalId=EXTERNAL:198603052385&externalId=EXTERNAL:200001011907",
                "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 400),
    ("lawyer", {"data": b'{"externalId": "EXTERNAL:1", "externalId": "EXTERNAL:2"}',
                "headers": {"Content-Type": "application/json"}}, 400),
    ("lawyer", {"data": b"<x/>", "headers": {"Content-Type": "application/xml"}}, 415),
])
async def test_anonymize_rules(gw, test_pki, recorder, client, kwargs, status):
    got, body, _ = await call(test_pki, client, "POST", gw + "/anonymize", **kwargs)
    assert got == status, body
    assert recorder.forwarded() == (["POST /anonymize"] if status == 200 else [])


# -- paths and methods that are not operations ---------------------------------------

@pytest.mark.parametrize("method, path", [
    ("GET", f"/orders/{ORDER_HR}/state/"),
    ("GET", f"/orders/{ORDER_HR}//state"),
    ("GET", f"//orders/{ORDER_HR}/state"),
    ("GET", f"/orders/{ORDER_HR}%2Fstate"),
    ("GET", f"/orders/{ORDER_HR}%2fstate"),
    ("GET", f"/orders/x/../{ORDER_HR}/state"),
    ("GET", f"/orders/{ORDER_HR}/%2e%2e/{ORDER_HR}/state"),
    ("GET", f"/orders/{ORDER_HR}/./state"),
    ("GET", f"/Orders/{ORDER_HR}/state"),
    ("GET", f"/orders/{ORDER_HR}/STATE"),
    ("GET", f"/orders/{ORDER_HR}/state?x=1"),
    ("GET", f"/orders/{ORDER_HR};x/state"),
    ("GET", f"/orders/{ORDER_HR}%3Bx/state"),
    ("GET", "/orders/not-a-guid/state"),
    ("GET", "/orders"),
    ("PUT", f"/orders/{ORDER_HR}"),
    ("PATCH", f"/orders/{ORDER_HR}"),
    ("HEAD", f"/orders/{ORDER_HR}/state"),
    ("OPTIONS", "/orders"),
    ("POST", f"/orders/{ORDER_HR}"),
    ("GET", "/anonymize"),
    ("GET", "/openapi.yaml"),
    ("POST", "/workflow/orders/" + ORDER_HR + "/cancel"),
    ("GET", "/healthz"),
])
async def test_paths_that_are_no_operation_are_404_and_not_forwarded(gw, test_pki, recorder, method, path):
    from yarl import URL

    got, body, _ = await call(test_pki, "hr-system", method, URL(gw + path, encoded=True))
    assert got == 404, body
    assert recorder.seen == []


@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"])
async def test_method_override_headers_change_nothing(gw, test_pki, recorder, header):
    got, _, _ = await call(test_pki, "crm", "GET", f"{gw}/orders/{ORDER_CRM}/state", headers={header: "DELETE"})
    assert got == 200
    assert recorder.forwarded() == [f"GET /orders/{ORDER_CRM}/state"]
    assert all(header.lower() not in (k.lower() for k, _ in r.headers) for r in recorder.seen)


async def test_body_on_a_get_is_refused(gw, test_pki, recorder):
    got, _, _ = await call(test_pki, "crm", "GET", f"{gw}/orders/{ORDER_CRM}/state", data=b"x")
    assert got == 400 and recorder.seen == []


# -- headers ----------------------------------------------------------------------------

SPOOFED = {
    "X-Forwarded-For": "10.9.9.9", "X-Forwarded-Proto": "http", "X-Forwarded-Host": "evil",
    "Forwarded": "for=10.9.9.9", "X-Client-Cert": "hr-system", "X-Client-Verify": "SUCCESS",
    "Client-Cert": ":MIIB:", "X-Identity-Token": "forged", "X-Request-ID": "mine", "X-Real-IP": "10.9.9.9",
    "Authorization": "Bearer forged", "Cookie": "session=1", "Proxy-Authorization": "x",
}


async def test_spoofed_identity_headers_are_dropped_and_the_gateways_own_set(gw, test_pki, recorder):
    got, _, resp = await call(test_pki, "crm", "GET", f"{gw}/orders/{ORDER_CRM}/state", headers=SPOOFED)
    assert got == 200
    assert resp.headers["X-Request-ID"] != "mine"
    for seen in recorder.seen:
        headers = {}
        for k, v in seen.headers:
            assert k.lower() not in headers, f"{k} reached the upstream twice"
            headers[k.lower()] = v
        assert headers["x-forwarded-for"] == "127.0.0.1"
        assert headers["x-forwarded-proto"] == "https"
        assert headers["x-request-id"] == resp.headers["X-Request-ID"]
        for name in ("x-forwarded-host", "forwarded", "x-client-cert", "x-client-verify", "client-cert",
                     "x-real-ip", "authorization", "cookie", "proxy-authorization", "x-identity-token"):
            assert name not in headers, name


async def test_hop_by_hop_response_headers_are_removed(gw, test_pki, recorder):
    got, body, resp = await call(test_pki, "crm", "GET", f"{gw}/orders/{ORDER_CRM}/document")
    assert got == 200 and len(body) == recorder.document_bytes
    assert "X-Secret-Hop" not in resp.headers
    assert resp.headers["Content-Type"] == "application/pdf"


async def test_a_second_content_encoding_is_not_missed(gw, test_pki, recorder):
    import gzip

    body = gzip.compress(multipart_bytes("b", [("solicitor", HR_SOLICITOR.encode(), None)]))
    async with session(test_pki, test_pki.client("hr-system")) as s:
        async with s.post(gw + "/orders", data=body, headers=[
            ("Content-Type", "multipart/form-data; boundary=b"),
            ("Content-Encoding", "identity"), ("Content-Encoding", "gzip")]) as resp:
            assert resp.status == 415
    assert recorder.seen == []


async def test_too_many_parts_are_refused(gw, test_pki, recorder):
    parts = [("solicitor", HR_SOLICITOR.encode(), None)] + [("x", b"", None)] * 300
    got, body, _ = await call(test_pki, "hr-system", "POST", gw + "/orders", data=multipart_bytes("b", parts),
                              headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert got == 400 and "more than 256 parts" in body["detail"]
    assert recorder.seen == []


async def test_lone_surrogates_in_json_fields_are_refused_and_audited(tmp_path, gw, test_pki, recorder):
    solicitor = '{"source":"INTERNAL","identifier":"sAMAccountName=\\ud800"}'
    got, body, _ = await call(test_pki, "hr-system", "POST", gw + "/orders", data=form((solicitor,)))
    assert got == 400 and "not valid JSON" in body["detail"]
    got, _, _ = await call(test_pki, "hr-system", "GET", f"{gw}/orders/{ORDER_HR}/state")
    assert got == 200  # the audit log and the gateway go on
