"""gateway/reference/openapi.yaml: a valid OpenAPI 3.1 document that describes exactly what the app serves.

The spec is checked three ways: as a document (openapi-spec-validator), against the
app's route table (the same set of method + path), and against real answers of the
reference API on a real socket (openapi-core validates status, headers, media type
and body of every answer, and the requests we send where they are meant to be valid).
"""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import datetime, timezone
from hashlib import sha256
from importlib import resources
from typing import Any, Mapping

import aiohttp
import pytest
import yaml
from multidict import CIMultiDict
from openapi_core import Config, OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.deserializing.media_types.util import json_loads, plain_loads
from openapi_core.exceptions import OpenAPIError
from openapi_core.protocols import Request as RequestProtocol
from openapi_core.protocols import Response as ResponseProtocol
from openapi_spec_validator import validate
from werkzeug.datastructures import Headers, ImmutableMultiDict
from yarl import URL

from conftest import SIGNER_EXTERNAL, create_order, order_form
from gateway.reference.app import STORE, create_app

SPEC_TEXT = resources.files("gateway.reference").joinpath("openapi.yaml").read_text(encoding="utf-8")
SPEC = yaml.safe_load(SPEC_TEXT)
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# aiohttp's names of path variables -> the names the spec uses.
PATH_VARIABLES = {"order_id": "orderId", "index": "index"}
UNKNOWN_ORDER = "5d7c2010-f461-4ceb-b66c-d6ef2a9a2802"
GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

OPENAPI = OpenAPI.from_dict(
    SPEC,
    config=Config(
        extra_media_type_deserializers={
            "application/problem+json": json_loads,
            "application/yaml": plain_loads,
        }
    ),
)


# -- openapi-core adapters for aiohttp's client side ---------------------------
# openapi_core.contrib.aiohttp adapts the server's web.Request/web.Response; these
# adapt what a client sent and received, following openapi_core.protocols.


class SentRequest:
    """A request as sent: openapi_core.protocols.Request."""

    def __init__(self, method: str, url: URL, headers: Mapping[str, str], body: bytes | None):
        self.method = method.lower()
        self.host_url = f"{url.scheme}://{url.raw_authority}"
        self.path = url.path
        self.body = body
        self.content_type = headers.get("Content-Type", "").lower()
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(list(url.query.items())),
            header=Headers(list(headers.items())),
            cookie=ImmutableMultiDict(),
        )


class ReceivedResponse:
    """A response as received: openapi_core.protocols.Response."""

    def __init__(self, status: int, headers: Mapping[str, str], data: bytes):
        self.status_code = status
        self.headers = Headers(list(headers.items()))  # looked up without regard to case
        self.content_type = headers.get("Content-Type", "").lower()
        self.data = data


@dataclasses.dataclass
class Exchange:
    request: SentRequest
    response: ReceivedResponse

    @property
    def status(self) -> int:
        return self.response.status_code

    @property
    def text(self) -> str:
        return self.response.data.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.response.data)


async def multipart(form: aiohttp.FormData) -> tuple[bytes, str]:
    """The exact bytes and Content-Type of a form, so that what is validated is what is sent."""
    writer = form()
    assert writer.content_type.startswith("multipart/form-data; boundary=")
    return await writer.as_bytes(), writer.content_type


def text_form(**fields: str) -> aiohttp.FormData:
    """multipart/form-data without a file (aiohttp would send such a form urlencoded)."""
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        form.add_field(name, value)
    return form


async def call(
    client, method: str, path: str, *, body: bytes | None = None, content_type: str | None = None,
    headers: Mapping[str, str] | None = None, valid_request: bool | None = True,
) -> Exchange:
    """Send one request and validate the answer against the spec.

    valid_request: True, the spec must accept the request; False, the spec must refuse it
    (the app refuses what the spec rules out); None, the spec cannot tell (e.g. a due
    date in the past), so the request is not checked.
    """
    sent_headers = CIMultiDict(headers or {})
    if content_type is not None:
        sent_headers["Content-Type"] = content_type
    resp = await client.request(method, path, data=body, headers=sent_headers)
    data = await resp.read()
    exchange = Exchange(
        SentRequest(method, resp.url, sent_headers, body),
        ReceivedResponse(resp.status, resp.headers, data),
    )
    if valid_request:
        OPENAPI.validate_request(exchange.request)
    elif valid_request is False:
        with pytest.raises(OpenAPIError):
            OPENAPI.validate_request(exchange.request)
    OPENAPI.validate_response(exchange.request, exchange.response)
    # Beyond the schemas: the id in the header is the one we sent (if usable) and the one of a problem.
    request_id = resp.headers["X-Request-ID"]
    sent_id = sent_headers.get("X-Request-ID")
    if sent_id is not None and re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", sent_id):
        assert request_id == sent_id
    else:
        assert GUID.fullmatch(request_id)
    if resp.status >= 400:
        problem = exchange.json()
        assert problem["request_id"] == request_id
        assert problem["status"] == resp.status
    return exchange


async def create(client, valid_request: bool | None = True, **overrides) -> Exchange:
    body, content_type = await multipart(order_form(**overrides))
    return await call(client, "POST", "/orders", body=body, content_type=content_type, valid_request=valid_request)


async def post_json(client, path: str, value: Any, valid_request: bool | None = True) -> Exchange:
    return await call(client, "POST", path, body=json.dumps(value).encode(), content_type="application/json",
                      valid_request=valid_request)


def assert_problem(exchange: Exchange, status: int, slug: str, field: str | None = None) -> dict:
    assert exchange.status == status, exchange.text
    assert exchange.response.content_type == "application/problem+json"
    problem = exchange.json()
    assert problem["type"] == f"urn:gateway:problem:{slug}"
    if field is not None:
        assert problem["field"] == field
    return problem


# -- the document ------------------------------------------------------------------


def test_spec_is_a_valid_openapi_3_1_document():
    validate(SPEC)  # raises OpenAPIValidationError on any fault
    assert SPEC["openapi"] == "3.1.0"
    description = SPEC["info"]["description"]
    assert "reference implementation of the vendor's Automation API" in description
    assert "workflow routes for tests" in description


def test_every_error_answer_is_a_problem():
    for path, item in SPEC["paths"].items():
        if path == "/readyz":   # a status document, as the gateway's admin /readyz: JSON when 503 too
            continue
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            for status, response in operation["responses"].items():
                if int(status) < 400:
                    continue
                ref = response["$ref"]
                content = SPEC["components"]["responses"][ref.rsplit("/", 1)[1]]["content"]
                assert list(content) == ["application/problem+json"], (method, path, status)
                schema = content["application/problem+json"]["schema"]["allOf"]
                assert schema[0] == {"$ref": "#/components/schemas/Problem"}
                assert schema[1]["properties"]["status"] == {"const": int(status)}, (method, path, status)
    problem = SPEC["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail", "request_id"}
    assert set(problem["properties"]) == {"type", "title", "status", "detail", "request_id", "field"}


def _spec_path(canonical: str) -> str:
    return re.sub(r"\{([^}]+)\}", lambda m: "{" + PATH_VARIABLES[m.group(1)] + "}", canonical)


async def test_spec_describes_exactly_the_routes_of_the_app(ref_settings, clock):
    app = create_app(ref_settings, clock=clock)
    try:
        routes = {
            (route.method, _spec_path(route.resource.canonical))
            for route in app.router.routes()
            if route.method != "HEAD"
        }
    finally:
        app[STORE].close()
    documented = {
        (method.upper(), path)
        for path, item in SPEC["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }
    assert len(routes) == 12
    assert documented == routes


# -- real answers -----------------------------------------------------------------


async def test_create_read_state_document_delete(ref):
    created = await create(ref, linkType="1", tags=['"urgent"', '{"project": 7}'],
                           option=['{"name": "notifyAllSigners", "value": true}'])
    assert created.status == 200
    assert created.response.content_type.startswith("text/plain")
    order_id = created.text
    assert GUID.fullmatch(order_id)

    read = await call(ref, "GET", f"/orders/{order_id}", headers={"X-Request-ID": "spec-test-1"})
    assert read.status == 200
    order = read.json()
    assert order["id"] == order_id
    assert order["state"] == "PENDING"
    assert order["linkType"] == 1
    assert order["tags"] == ["urgent", {"project": 7}]
    assert order["options"] == [{"name": "notifyAllSigners", "value": True}]
    assert order["solicitor"]["name"] == "Christer Borgström"
    assert [s["index"] for s in order["signers"]] == [0, 1]
    assert order["signers"][1]["mail"] == "anna@example.org"  # from the request: the directory has none
    assert order["signers"][0]["actedAt"] is None
    assert order["document"]["name"] == "signthisplease.pdf"
    assert order["document"]["sha256"] == order["document"]["originalSha256"]

    state = await call(ref, "GET", f"/orders/{order_id}/state")
    assert state.status == 200
    assert state.text == "PENDING"

    doc = await call(ref, "GET", f"/orders/{order_id}/document")
    assert doc.status == 200
    assert doc.response.content_type == "application/pdf"
    assert doc.response.data.startswith(b"%PDF-")
    assert doc.response.headers["ETag"] == f'"{sha256(doc.response.data).hexdigest()}"'
    assert doc.response.headers["ETag"] == f'"{order["document"]["sha256"]}"'
    assert doc.response.headers["Content-Disposition"] == 'attachment; filename="signthisplease.pdf"'

    deleted = await call(ref, "DELETE", f"/orders/{order_id}")
    assert deleted.status == 204
    assert deleted.response.data == b""
    for method, path in (("GET", ""), ("GET", "/state"), ("GET", "/document"), ("DELETE", "")):
        gone = await call(ref, method, f"/orders/{order_id}{path}")
        assert_problem(gone, 404, "not-found")


async def test_sign_until_accepted_then_no_more_changes(ref):
    order_id = await create_order(ref)
    first = await call(ref, "POST", f"/workflow/orders/{order_id}/signers/0/sign")
    assert first.status == 200 and first.text == "PENDING"
    again = await call(ref, "POST", f"/workflow/orders/{order_id}/signers/0/sign")
    assert_problem(again, 409, "conflict")
    last = await call(ref, "POST", f"/workflow/orders/{order_id}/signers/1/sign")
    assert last.status == 200 and last.text == "ACCEPTED"

    order = (await call(ref, "GET", f"/orders/{order_id}")).json()
    assert order["state"] == "ACCEPTED"
    assert [s["state"] for s in order["signers"]] == ["SIGNED", "SIGNED"]
    assert all(s["actedAt"] is not None for s in order["signers"])
    assert order["document"]["signatures"] == 2
    assert order["document"]["sha256"] != order["document"]["originalSha256"]
    doc = await call(ref, "GET", f"/orders/{order_id}/document")
    assert doc.response.headers["ETag"] == f'"{order["document"]["sha256"]}"'

    # The final state is final: 409 for the solicitor and for the signers.
    assert_problem(await call(ref, "POST", f"/workflow/orders/{order_id}/cancel"), 409, "conflict")
    assert_problem(await call(ref, "POST", f"/workflow/orders/{order_id}/signers/0/reject"), 409, "conflict")


async def test_reject_and_cancel(ref):
    rejected_id = await create_order(ref)
    rejected = await call(ref, "POST", f"/workflow/orders/{rejected_id}/signers/1/reject")
    assert rejected.status == 200 and rejected.text == "REJECTED"
    assert (await call(ref, "GET", f"/orders/{rejected_id}/state")).text == "REJECTED"
    assert_problem(await call(ref, "POST", f"/workflow/orders/{rejected_id}/signers/0/sign"), 409, "conflict")

    cancelled_id = await create_order(ref)
    cancelled = await call(ref, "POST", f"/workflow/orders/{cancelled_id}/cancel")
    assert cancelled.status == 200 and cancelled.text == "CANCELLED"
    assert (await call(ref, "GET", f"/orders/{cancelled_id}/state")).text == "CANCELLED"
    assert_problem(await call(ref, "POST", f"/workflow/orders/{cancelled_id}/cancel"), 409, "conflict")


async def test_expired_order(ref, clock):
    order_id = await create_order(ref)
    clock.now = datetime(2100, 1, 1, tzinfo=timezone.utc).timestamp()
    state = await call(ref, "GET", f"/orders/{order_id}/state")
    assert state.text == "EXPIRED"
    order = (await call(ref, "GET", f"/orders/{order_id}")).json()
    assert order["state"] == "EXPIRED"
    assert_problem(await call(ref, "POST", f"/workflow/orders/{order_id}/signers/0/sign"), 409, "conflict")


async def test_anonymize_json_and_multipart(ref):
    order_id = await create_order(ref)
    # A person with a PENDING order cannot be anonymized.
    pending = await post_json(ref, "/anonymize", {"externalId": "EXTERNAL:198603052385"})
    assert_problem(pending, 409, "conflict")
    await call(ref, "POST", f"/workflow/orders/{order_id}/cancel")

    by_external = await post_json(ref, "/anonymize", {"externalId": "EXTERNAL:198603052385"})
    assert by_external.status == 200
    assert by_external.json() == {"anonymized": 1}

    order = (await call(ref, "GET", f"/orders/{order_id}")).json()
    anna = order["signers"][1]
    anonymized = (anna["givenName"], anna["surname"], anna["mail"], anna["mobile"])
    assert anonymized == ("ANONYMIZED", "ANONYMIZED", None, None)

    body, content_type = await multipart(text_form(internalId=order["solicitor"]["internalId"].upper()))
    by_internal = await call(ref, "POST", "/anonymize", body=body, content_type=content_type)
    assert by_internal.status == 200
    assert by_internal.json() == {"anonymized": 1}
    order = (await call(ref, "GET", f"/orders/{order_id}")).json()
    assert order["solicitor"]["givenName"] == "ANONYMIZED"
    # The solicitor is also signer 0: one person, one new internal UUID.
    assert order["solicitor"]["internalId"] == order["signers"][0]["internalId"]

    # ldapSearch as a JSON object: jane.doe has no orders, so nobody to anonymize.
    by_search = await post_json(
        ref, "/anonymize", {"ldapSearch": {"source": "INTERNAL", "identifier": "sAMAccountName=jane.doe"}}
    )
    assert_problem(by_search, 404, "not-found")
    body, content_type = await multipart(text_form(ldapSearch=SIGNER_EXTERNAL))
    again = await call(ref, "POST", "/anonymize", body=body, content_type=content_type)
    assert_problem(again, 404, "not-found")  # already anonymized


async def test_anonymize_errors(ref):
    two = await post_json(ref, "/anonymize", {"internalId": UNKNOWN_ORDER, "externalId": "EXTERNAL:1"},
                          valid_request=False)
    assert_problem(two, 400, "invalid-field", "externalId")  # the second of two identifiers is the one too many
    bad_uuid = await post_json(ref, "/anonymize", {"internalId": "not-a-uuid"}, valid_request=False)
    assert_problem(bad_uuid, 400, "invalid-field", "internalId")
    not_json = await call(ref, "POST", "/anonymize", body=b"{", content_type="application/json", valid_request=None)
    assert_problem(not_json, 400, "malformed-body")
    too_large = await post_json(ref, "/anonymize", {"externalId": "EXTERNAL:" + "1" * 70000}, valid_request=None)
    assert_problem(too_large, 413, "body-too-large")
    plain = await call(ref, "POST", "/anonymize", body=b"externalId=EXTERNAL:1", content_type="text/plain",
                       valid_request=False)
    assert_problem(plain, 415, "unsupported-media-type")


async def test_create_errors(ref):
    bad_due = await create(ref, valid_request=False, dueDate="24/12/2099")
    assert_problem(bad_due, 400, "invalid-field", "dueDate")
    past_due = await create(ref, valid_request=None, dueDate="2001-01-01T00:00:00")
    assert_problem(past_due, 400, "invalid-field", "dueDate")
    body, content_type = await multipart(order_form(signers=None))
    no_signers = await call(ref, "POST", "/orders", body=body, content_type=content_type, valid_request=False)
    assert_problem(no_signers, 400, "invalid-field", "signers")
    not_pdf = await create(ref, valid_request=None, upload=b"hello")
    assert_problem(not_pdf, 400, "invalid-field", "upload")
    as_json = await post_json(ref, "/orders", {"title": "t"}, valid_request=False)
    assert_problem(as_json, 415, "unsupported-media-type")
    too_large = await create(ref, valid_request=None, upload=b"%PDF-" + b"0" * (3 * 1024 * 1024))  # limit 2 MiB
    assert_problem(too_large, 413, "body-too-large")
    base64_part = (
        b'--b\r\nContent-Disposition: form-data; name="title"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        b"VGl0bGU=\r\n--b--\r\n"
    )
    ambiguous = await call(ref, "POST", "/orders", body=base64_part, content_type="multipart/form-data; boundary=b",
                           valid_request=None)
    assert_problem(ambiguous, 400, "ambiguous-body")


async def test_path_errors(ref):
    order_id = await create_order(ref)
    not_guid = await call(ref, "GET", "/orders/not-a-guid", valid_request=False)
    assert_problem(not_guid, 400, "invalid-field", "orderId")
    for method, path in (
        ("GET", f"/orders/{UNKNOWN_ORDER}"),
        ("GET", f"/orders/{UNKNOWN_ORDER}/state"),
        ("GET", f"/orders/{UNKNOWN_ORDER}/document"),
        ("DELETE", f"/orders/{UNKNOWN_ORDER}"),
        ("POST", f"/workflow/orders/{UNKNOWN_ORDER}/signers/0/sign"),
        ("POST", f"/workflow/orders/{UNKNOWN_ORDER}/signers/0/reject"),
        ("POST", f"/workflow/orders/{UNKNOWN_ORDER}/cancel"),
        ("POST", f"/workflow/orders/{order_id}/signers/2/sign"),  # two signers: 0 and 1
        ("POST", f"/workflow/orders/{order_id}/signers/7/reject"),
    ):
        assert_problem(await call(ref, method, path), 404, "not-found")
    bad_index = await call(ref, "POST", f"/workflow/orders/{order_id}/signers/-1/sign", valid_request=False)
    assert_problem(bad_index, 400, "invalid-field", "index")


async def test_unauthenticated_answers_401_on_the_vendor_routes_only(aiohttp_client, ref_settings, clock):
    def verify(request):
        if request.headers.get("X-Test-Token") != "good":
            raise PermissionError("no valid identity token")

    settings = dataclasses.replace(ref_settings, verify_token=verify)
    client = await aiohttp_client(create_app(settings, clock=clock))
    token = {"X-Test-Token": "good"}

    refused = await create(client)
    assert_problem(refused, 401, "unauthenticated")
    body, content_type = await multipart(order_form())
    created = await call(client, "POST", "/orders", body=body, content_type=content_type, headers=token)
    assert created.status == 200
    order_id = created.text
    for method, path in (("GET", ""), ("GET", "/state"), ("GET", "/document"), ("DELETE", "")):
        assert_problem(await call(client, method, f"/orders/{order_id}{path}"), 401, "unauthenticated")
    refused = await post_json(client, "/anonymize", {"externalId": "EXTERNAL:198603052385"})
    assert_problem(refused, 401, "unauthenticated")
    # The workflow and service routes take no token.
    assert (await call(client, "POST", f"/workflow/orders/{order_id}/cancel")).text == "CANCELLED"
    assert (await call(client, "GET", "/healthz")).text == "ok"


async def test_openapi_and_healthz(ref):
    spec = await call(ref, "GET", "/openapi.yaml")
    assert spec.status == 200
    assert spec.response.content_type.startswith("application/yaml")
    assert yaml.safe_load(spec.text) == SPEC
    health = await call(ref, "GET", "/healthz")
    assert health.status == 200 and health.text == "ok"
    # An X-Request-ID outside the pattern is refused by the spec, and replaced by a new UUID by the app.
    odd_id = await call(ref, "GET", "/healthz", headers={"X-Request-ID": "not usable!"}, valid_request=False)
    assert odd_id.response.headers["X-Request-ID"] != "not usable!"


# -- the checks above can fail ----------------------------------------------------


async def test_validation_refuses_answers_that_differ_from_the_spec(ref):
    """The spec is strict enough that the checks above mean something."""
    order_id = await create_order(ref)
    read = await call(ref, "GET", f"/orders/{order_id}")
    missing = await call(ref, "GET", f"/orders/{UNKNOWN_ORDER}")
    state = await call(ref, "GET", f"/orders/{order_id}/state")
    doc = await call(ref, "GET", f"/orders/{order_id}/document")
    signed = await call(ref, "POST", f"/workflow/orders/{order_id}/signers/0/sign")

    def body(exchange: Exchange, change) -> tuple[SentRequest, ReceivedResponse]:
        value = exchange.json()
        change(value)
        r = exchange.response
        return exchange.request, ReceivedResponse(r.status_code, r.headers, json.dumps(value).encode())

    def raw(exchange: Exchange, status: int | None = None, data: bytes | None = None,
            **headers: str | None) -> tuple[SentRequest, ReceivedResponse]:
        h = CIMultiDict(exchange.response.headers.items())
        for name, value in headers.items():
            h.popall(name.replace("_", "-"), None)
            if value is not None:
                h[name.replace("_", "-")] = value
        r = exchange.response
        return exchange.request, ReceivedResponse(status or r.status_code, h, r.data if data is None else data)

    # Each answer passes as it came ...
    for exchange in (read, missing, state, doc, signed):
        OPENAPI.validate_response(*raw(exchange))
    OPENAPI.validate_response(*body(read, lambda o: None))
    # ... and fails with any of these changes.
    tampered = {
        "unknown order key": body(read, lambda o: o.update(extra=1)),
        "unknown state": body(read, lambda o: o.update(state="DONE")),
        "unknown signer key": body(read, lambda o: o["signers"][0].update(extra=1)),
        "unknown solicitor key": body(read, lambda o: o["solicitor"].update(extra=1)),
        "solicitor without mail": body(read, lambda o: o["solicitor"].pop("mail")),
        "signer without actedAt": body(read, lambda o: o["signers"][1].pop("actedAt")),
        "malformed sha256": body(read, lambda o: o["document"].update(sha256="xyz")),
        "malformed dueDate": body(read, lambda o: o.update(dueDate="2099-12-24 00:00")),
        "non-UTC timestamp": body(read, lambda o: o.update(created="2024-01-01T00:00:00+01:00")),
        "linkType 2": body(read, lambda o: o.update(linkType=2)),
        "problem status unlike the answer": body(missing, lambda p: p.update(status=400)),
        "problem without request_id": body(missing, lambda p: p.pop("request_id")),
        "problem with unknown key": body(missing, lambda p: p.update(extra="x")),
        "404 as invalid-field": body(missing, lambda p: p.update(type="urn:gateway:problem:invalid-field")),
        "404 titled otherwise": body(missing, lambda p: p.update(title="Gone")),
        "no X-Request-ID": raw(read, X_Request_ID=None),
        "malformed X-Request-ID": raw(read, X_Request_ID="a b"),
        "undocumented status": raw(read, status=201),
        "problem as application/json": raw(missing, Content_Type="application/json"),
        "unknown state text": raw(state, data=b"DONE"),
        "sign answering REJECTED": raw(signed, data=b"REJECTED"),
        "document without ETag": raw(doc, ETag=None),
        "malformed ETag": raw(doc, ETag="x"),
        "document inline": raw(doc, Content_Disposition="inline"),
        "document as JSON": raw(doc, Content_Type="application/json"),
    }
    accepted = []
    for name, (request, response) in tampered.items():
        try:
            OPENAPI.validate_response(request, response)
        except OpenAPIError:
            continue
        accepted.append(name)
    assert accepted == []


def test_adapters_follow_the_openapi_core_protocols():
    request = SentRequest("GET", URL("http://127.0.0.1:1/healthz?a=1"), {"Content-Type": "text/plain"}, None)
    response = ReceivedResponse(200, {"Content-Type": "text/plain; charset=utf-8"}, b"ok")
    assert isinstance(request, RequestProtocol)
    assert isinstance(response, ResponseProtocol)
    assert request.host_url == "http://127.0.0.1:1"
    assert request.parameters.query.getlist("a") == ["1"]
