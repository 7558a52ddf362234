"""The six operations of the Automation API and the strict request -> operation map.

One table, used by the router, the policy checker, `policy explain` and metric
labels. A request maps to an operation only when its method and its path,
decoded once, match exactly; anything else is "no operation" (404) and never
reaches the upstream. The path sent upstream is rebuilt from the operation and
the canonical (lower-case) order id, never copied from the client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from urllib.parse import unquote


class Operation(str, Enum):
    CREATE_ORDER = "create_order"
    DELETE_ORDER = "delete_order"
    READ_ORDER = "read_order"
    ORDER_STATE = "order_state"
    DOWNLOAD_DOCUMENT = "download_document"
    ANONYMIZE_USER = "anonymize_user"


ORDER_SCOPED = frozenset({
    Operation.DELETE_ORDER, Operation.READ_ORDER, Operation.ORDER_STATE, Operation.DOWNLOAD_DOCUMENT,
})
WITH_BODY = frozenset({Operation.CREATE_ORDER, Operation.ANONYMIZE_USER})

_GUID = r"(?P<id>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"
# (method, path pattern, operation, upstream path template)
TABLE: tuple[tuple[str, re.Pattern, Operation, str], ...] = (
    ("POST", re.compile(r"/orders"), Operation.CREATE_ORDER, "/orders"),
    ("DELETE", re.compile(rf"/orders/{_GUID}"), Operation.DELETE_ORDER, "/orders/{id}"),
    ("GET", re.compile(rf"/orders/{_GUID}"), Operation.READ_ORDER, "/orders/{id}"),
    ("GET", re.compile(rf"/orders/{_GUID}/state"), Operation.ORDER_STATE, "/orders/{id}/state"),
    ("GET", re.compile(rf"/orders/{_GUID}/document"), Operation.DOWNLOAD_DOCUMENT, "/orders/{id}/document"),
    ("POST", re.compile(r"/anonymize"), Operation.ANONYMIZE_USER, "/anonymize"),
)
# Characters that, encoded, could change how some server splits or normalises a path.
_FORBIDDEN_ENCODED = re.compile(r"%(2[fF]|5[cC]|2[eE]|00|25|3[fF]|23|3[bB])")


_CREATED = re.compile(rb"\s*" + _GUID.replace("(?P<id>", "(").encode() + rb"\s*")


def created_order_id(body: bytes) -> str | None:
    """The new order's GUID in an answered create_order (text/plain, as the vendor documents it), else None.

    Only a GUID is taken: the audit line names the order, never whatever else an upstream answered.
    """
    if len(body) > 64 or not _CREATED.fullmatch(body):
        return None
    return body.strip().decode("ascii").lower()


@dataclass(frozen=True)
class Route:
    operation: Operation
    order_id: str | None
    upstream_path: str


ROUTES_KEPT = 4096
ROUTE_KEPT_LENGTH = 96   # /orders/{GUID}/document is 61 characters
_routes: dict[tuple[str, str], Route | None] = {}


def route(method: str, raw_path: str) -> Route | None:
    """Map a request line's method and raw path (query included) to an operation, or None.

    The answer for each (method, raw path) is kept (a Route is immutable): a client polling an
    order's state sends the same line again and again. Only lines as short as the API's own are
    kept, and at ROUTES_KEPT the memory is dropped whole: a flood of distinct paths costs no more
    memory than a few hundred KiB, and no more time than mapping each one.
    """
    if len(raw_path) > ROUTE_KEPT_LENGTH:
        return _route(method, raw_path)
    key = (method, raw_path)
    try:
        return _routes[key]
    except KeyError:
        pass
    found = _route(method, raw_path)
    if len(_routes) >= ROUTES_KEPT:
        _routes.clear()
    _routes[key] = found
    return found


def _route(method: str, raw_path: str) -> Route | None:
    if "?" in raw_path or "#" in raw_path:
        return None
    if _FORBIDDEN_ENCODED.search(raw_path):
        return None
    try:
        path = unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        return None
    if not path.isascii():
        return None
    for m, pattern, operation, template in TABLE:
        if m != method:
            continue
        match = pattern.fullmatch(path)
        if match:
            order_id = match.groupdict().get("id")
            order_id = order_id.lower() if order_id else None
            return Route(operation, order_id, template.format(id=order_id))
    return None
