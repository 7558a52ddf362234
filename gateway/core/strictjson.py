"""JSON read one way only: duplicate keys, NaN and Infinity are refused.

Python's json takes the last of duplicate keys; another reader may take the
first. A gateway that checks a value must read it exactly as its upstream does,
so both sides refuse what could be read two ways.
"""

from __future__ import annotations

import json
from typing import Any


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen[key] = value
    return seen


def strict_json(text: str) -> Any:
    """json.loads that refuses duplicate keys, NaN/Infinity and lone surrogates (text that is no Unicode)."""
    value = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    if "\\u" in text:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone surrogate") from None
    return value


def json_value(text: str | Exception) -> Any:
    """A field's JSON value, or the Exception that says why it has none."""
    if isinstance(text, Exception):
        return text
    try:
        return strict_json(text)
    except (ValueError, RecursionError) as exc:
        return ValueError(str(exc))
