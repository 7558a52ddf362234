"""gateway.core.operations: strict method + raw path -> operation, nothing else."""

from __future__ import annotations

import pytest

from gateway.core.operations import ORDER_SCOPED, TABLE, WITH_BODY, Operation, Route, route

GUID = "0f8fad5b-d9cb-469f-a165-70867728950e"
GUID_UPPER = GUID.upper()


@pytest.mark.parametrize("method, path, operation, order_id, upstream", [
    ("POST", "/orders", Operation.CREATE_ORDER, None, "/orders"),
    ("DELETE", f"/orders/{GUID}", Operation.DELETE_ORDER, GUID, f"/orders/{GUID}"),
    ("GET", f"/orders/{GUID}", Operation.READ_ORDER, GUID, f"/orders/{GUID}"),
    ("GET", f"/orders/{GUID}/state", Operation.ORDER_STATE, GUID, f"/orders/{GUID}/state"),
    ("GET", f"/orders/{GUID}/document", Operation.DOWNLOAD_DOCUMENT, GUID, f"/orders/{GUID}/document"),
    ("POST", "/anonymize", Operation.ANONYMIZE_USER, None, "/anonymize"),
])
def test_every_row_maps(method, path, operation, order_id, upstream):
    assert route(method, path) == Route(operation, order_id, upstream)


@pytest.mark.parametrize("method, suffix, operation", [
    ("DELETE", "", Operation.DELETE_ORDER),
    ("GET", "", Operation.READ_ORDER),
    ("GET", "/state", Operation.ORDER_STATE),
    ("GET", "/document", Operation.DOWNLOAD_DOCUMENT),
])
def test_upper_case_guid_is_canonicalised(method, suffix, operation):
    mixed = GUID_UPPER[:10] + GUID[10:]
    for given in (GUID_UPPER, mixed):
        r = route(method, f"/orders/{given}{suffix}")
        assert r is not None
        assert r.operation is operation
        assert r.order_id == GUID
        assert r.upstream_path == f"/orders/{GUID}{suffix}"


def test_table_covers_every_operation_once_per_method_path():
    assert {op for _, _, op, _ in TABLE} == set(Operation)
    assert ORDER_SCOPED == {Operation.DELETE_ORDER, Operation.READ_ORDER,
                            Operation.ORDER_STATE, Operation.DOWNLOAD_DOCUMENT}
    assert WITH_BODY == {Operation.CREATE_ORDER, Operation.ANONYMIZE_USER}


TRICKS = [
    # trailing slash, double slash, dot segments
    ("POST", "/orders/"), ("POST", "//orders"), ("POST", "/orders//"),
    ("GET", f"/orders/{GUID}/"), ("GET", f"/orders//{GUID}"), ("GET", f"//orders/{GUID}"),
    ("GET", f"/orders/{GUID}//state"), ("GET", f"/orders/{GUID}/state/"),
    ("POST", "/x/../orders"), ("POST", "/./orders"), ("POST", "/orders/."), ("POST", "/orders/.."),
    ("GET", f"/orders/{GUID}/../{GUID}"), ("GET", f"/orders/./{GUID}"),
    ("GET", f"/orders/{GUID}/./state"), ("POST", "/anonymize/.."), ("POST", "/anonymize/"),
    # encoded slash, backslash, dot, percent, NUL, ?, #, ;
    ("GET", f"/orders%2F{GUID}"), ("GET", f"/orders%2f{GUID}"), ("GET", f"/orders/{GUID}%2Fstate"),
    ("GET", f"/orders%5C{GUID}"), ("GET", f"/orders%5c{GUID}"), ("POST", "/orders%5C"),
    ("POST", "/%2e/orders"), ("POST", "/%2E%2E/orders"), ("GET", f"/orders/{GUID}/%2e%2e/{GUID}"),
    ("POST", "/orders%25"), ("POST", "/%256Frders"), ("POST", "/orders%00"), ("POST", "/anonymize%00"),
    ("POST", "/orders%3F"), ("POST", "/orders%3fx=1"), ("POST", "/orders%23"), ("POST", "/orders%23x"),
    ("POST", "/orders%3B"), ("POST", "/orders%3bx"), ("GET", f"/orders/{GUID}%3Bjsessionid=1"),
    # literal ; too: the path words are exact
    ("POST", "/orders;x"), ("GET", f"/orders/{GUID};/state"),
    # query strings and fragments
    ("POST", "/orders?"), ("POST", "/orders?x=1"), ("GET", f"/orders/{GUID}?a=b"),
    ("POST", "/anonymize?_method=DELETE"), ("POST", "/orders#"), ("POST", "/orders#frag"),
    ("GET", f"/orders/{GUID}/state#x"),
    # wrong case of path words
    ("POST", "/Orders"), ("POST", "/ORDERS"), ("POST", "/Anonymize"), ("GET", f"/Orders/{GUID}"),
    ("GET", f"/orders/{GUID}/State"), ("GET", f"/orders/{GUID}/DOCUMENT"),
    # non-ASCII, raw or after decoding
    ("POST", "/ordérs"), ("POST", "/orders\u00a0"), ("POST", "/%C3%B6rders"),
    ("POST", "/orders%C2%A0"), ("GET", f"/orders/{GUID}/st%C3%A4te"),
    # not GUIDs
    ("GET", "/orders/123"), ("GET", f"/orders/{GUID}x"), ("GET", f"/orders/{{{GUID}}}"),
    ("GET", "/orders/" + GUID.replace("-", "")), ("GET", f"/orders/{GUID[:-1]}g"),
    ("GET", f"/orders/{GUID}/other"), ("GET", "/orders"), ("DELETE", "/orders"),
    # wrong methods
    ("HEAD", "/orders"), ("PUT", "/orders"), ("PATCH", "/orders"), ("OPTIONS", "/orders"),
    ("GET", "/orders"), ("GET", "/anonymize"), ("DELETE", "/anonymize"),
    ("HEAD", f"/orders/{GUID}"), ("PUT", f"/orders/{GUID}"), ("PATCH", f"/orders/{GUID}"),
    ("OPTIONS", f"/orders/{GUID}"), ("POST", f"/orders/{GUID}"), ("DELETE", f"/orders/{GUID}/state"),
    ("POST", f"/orders/{GUID}/document"), ("TRACE", "/orders"), ("CONNECT", "/orders"),
    ("post", "/orders"), ("Get", f"/orders/{GUID}"), ("", "/orders"),
    # absolute-form and other target forms, empty path
    ("POST", "http://x/orders"), ("POST", "https://x/orders"), ("GET", f"http://x/orders/{GUID}"),
    ("POST", "orders"), ("POST", "*"), ("POST", ""), ("GET", ""), ("POST", "/"),
    # whitespace and control characters
    ("POST", " /orders"), ("POST", "/orders "), ("POST", "/orders\n"), ("POST", "/orders\t"),
    ("POST", "/orders%0A"), ("POST", "/orders%20"), ("POST", "/orders\x00"),
]


@pytest.mark.parametrize("method, path", TRICKS)
def test_tricks_map_to_nothing(method, path):
    assert route(method, path) is None


@pytest.mark.parametrize("method, path, operation", [
    ("POST", "/%6Frders", Operation.CREATE_ORDER),
    ("POST", "/%6frders", Operation.CREATE_ORDER),
    ("POST", "/%6F%72%64%65%72%73", Operation.CREATE_ORDER),
    ("POST", "/anonymiz%65", Operation.ANONYMIZE_USER),
    ("GET", f"/orders/{GUID}/st%61te", Operation.ORDER_STATE),
    ("GET", "/orders/%30" + GUID[1:], Operation.READ_ORDER),
])
def test_decoding_happens_once(method, path, operation):
    r = route(method, path)
    assert r is not None and r.operation is operation
    # the upstream path is rebuilt, never the client's encoded form
    assert "%" not in r.upstream_path


@pytest.mark.parametrize("path", ["/%256Frders", "/%25366Frders", "/%2536%46rders"])
def test_double_encoding_is_not_decoded_twice(path):
    assert route("POST", path) is None


@pytest.mark.parametrize("path", ["/orders%FF", "/%C3rders", f"/orders/{GUID}/state%80"])
def test_invalid_utf8_after_decoding_is_no_operation(path):
    assert route("POST", path) is None


def test_decoded_order_id_is_canonical():
    encoded = "".join(f"%{ord(c):02X}" for c in GUID_UPPER)
    r = route("GET", f"/orders/{encoded}/document")
    assert r == Route(Operation.DOWNLOAD_DOCUMENT, GUID, f"/orders/{GUID}/document")


def test_route_is_frozen():
    r = route("POST", "/orders")
    with pytest.raises(AttributeError):
        r.operation = Operation.ANONYMIZE_USER  # type: ignore[misc]


def test_a_mapped_line_is_kept_and_the_memory_stays_bounded(monkeypatch):
    from gateway.core import operations

    monkeypatch.setattr(operations, "_routes", {})
    monkeypatch.setattr(operations, "ROUTES_KEPT", 3)
    path = "/orders/22222222-2222-4222-8222-22222222222A/state"
    first = route("GET", path)
    assert route("GET", path) is first and first.order_id == "22222222-2222-4222-8222-22222222222a"
    assert route("DELETE", path) is None and route("GET", path + "/x") is None
    assert len(operations._routes) == 3
    route("GET", "/orders")   # the fourth line: the memory starts again
    assert list(operations._routes) == [("GET", "/orders")]
    long = "/orders/" + "a" * 200
    assert route("GET", long) is None and ("GET", long) not in operations._routes
