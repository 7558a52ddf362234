"""Typed documents: frozen dataclasses define the keys a YAML mapping may have, for the loader and for editors.

Each field of a section is a key; `setting(...)` gives its default, a line saying what
it is for, and its constraints (choices, bounds, a pattern). `build()` checks a parsed
document against the fields and makes the dataclasses, naming `file: key: problem` on
the first thing wrong; `json_schema()` describes the same fields as JSON Schema, so
that an editor (yaml-language-server and others) validates and completes the file
with the rules the loader applies. Unknown keys are errors in both: a misspelt
security setting never falls back to a default unnoticed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

from gateway.core.errors import SettingsError

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = None, choices: tuple = (),
            minimum: float | None = None, maximum: float | None = None, pattern: str | None = None,
            pattern_message: str | None = None, key: bool = True) -> Any:
    """A field of a section: its default and what the loader and the schema hold it to.

    Numbers are at least 0 (integers) or above 0 (other numbers) unless `minimum` says otherwise.
    `key=False` marks a field that is no key of the file (set by the loader itself).
    """
    metadata = {"doc": doc, "choices": tuple(choices), "minimum": minimum, "maximum": maximum,
                "pattern": pattern, "pattern_message": pattern_message, "key": key}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def keys(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("key", True)]


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return type(None) in args, inner[0]
    return False, tp


# -- checking a document -----------------------------------------------------------------------


def build(cls: type, data: dict, file: str | Path, base: Path, prefix: str = "") -> Any:
    """The dataclass `cls` from a parsed mapping; relative paths are taken from `base`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in keys(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise SettingsError(file, where, "unknown key")
        kwargs[key] = _convert(value, hints[key], fields[key].metadata, where, file, base)
    # Relative defaults are relative to the file's folder too, in a section left out as well.
    for f in keys(cls):
        if f.name in kwargs:
            continue
        if hints[f.name] is Path and f.default is not dataclasses.MISSING:
            kwargs[f.name] = base / f.default
        elif dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build(hints[f.name], {}, file, base, f"{prefix}.{f.name}" if prefix else f.name)
    return cls(**kwargs)


def _convert(value: Any, tp: Any, meta: dict, where: str, file: str | Path, base: Path) -> Any:
    optional, tp = _is_optional(tp)
    if value is None and optional:
        return None
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise SettingsError(file, where, "must be a mapping")
        return build(tp, value, file, base, where)
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise SettingsError(file, where, "must be a non-empty path")
        path = Path(value)
        return path if path.is_absolute() else base / path
    if tp is bool:
        if not isinstance(value, bool):
            raise SettingsError(file, where, "must be true or false")
        return value
    if tp in (int, float):
        return _number(value, tp, meta, where, file)
    if tp is str:
        if value is False and "off" in meta.get("choices", ()):
            value = "off"   # YAML 1.1 reads a bare `off` as false
        if not isinstance(value, str):
            raise SettingsError(file, where, "must be a string")
        if meta.get("choices") and value not in meta["choices"]:
            raise SettingsError(file, where, f"must be one of {', '.join(meta['choices'])}")
        if meta.get("pattern") and not re.fullmatch(meta["pattern"], value):
            raise SettingsError(file, where, meta.get("pattern_message") or f"must match {meta['pattern']}")
        return value
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SettingsError(file, where, "must be a list of strings")
        return tuple(value)
    raise SettingsError(file, where, f"unsupported type {tp!r}")  # pragma: no cover


def whole(value: Any) -> int | None:
    """An integer as JSON Schema counts them (2 and 2.0, not true), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _number(value: Any, tp: type, meta: dict, where: str, file: str | Path) -> int | float:
    low, high = meta.get("minimum"), meta.get("maximum")
    if tp is int:
        value = whole(value)
        if value is None or value < 0:
            raise SettingsError(file, where, "must be a non-negative integer")
    elif low == 0:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise SettingsError(file, where, "must be a number, 0 or more")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise SettingsError(file, where, "must be a positive number")
    if low is not None and value < low:
        raise SettingsError(file, where, f"must be at least {low}")
    if high is not None and value > high:
        raise SettingsError(file, where, f"must be at most {high}")
    return tp(value)


# -- describing it ------------------------------------------------------------------------------


def json_schema(cls: type, title: str) -> dict:
    """JSON Schema (2020-12) of the document whose top section is `cls`."""
    schema = {"$schema": DIALECT, "title": title}
    schema.update(_object(cls))
    return schema


def _object(cls: type) -> dict:
    hints = typing.get_type_hints(cls)
    properties = {f.name: _property(hints[f.name], f) for f in keys(cls)}
    out = {"type": "object", "additionalProperties": False, "properties": properties}
    doc = (cls.__doc__ or "").strip()
    if doc and not doc.startswith(cls.__name__ + "("):   # dataclasses make up a docstring of their own
        out["description"] = doc
    return out


def _property(tp: Any, f: dataclasses.Field) -> dict:
    optional, tp = _is_optional(tp)
    meta, about = f.metadata, {}
    if dataclasses.is_dataclass(tp):
        out = _object(tp)
        out["type"] = ["object", "null"]   # an empty section (`tls:`) is the defaults
    else:
        out = _scalar(tp, meta)
        if f.default is not dataclasses.MISSING:
            about["default"] = str(f.default) if isinstance(f.default, Path) else f.default
        elif f.default_factory is not dataclasses.MISSING:
            about["default"] = list(f.default_factory())
    if meta.get("doc"):
        about["description"] = meta["doc"]
    if optional:
        out = {"anyOf": [out, {"type": "null"}]}
    return {**out, **about}


def _scalar(tp: Any, meta: dict) -> dict:
    if tp is Path:
        return {"type": "string", "minLength": 1}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        out: dict = {"type": "integer", "minimum": meta.get("minimum") or 0}
    elif tp is float:
        out = {"type": "number"}
        if meta.get("minimum") == 0:
            out["minimum"] = 0
        else:
            out["exclusiveMinimum"] = 0
            if meta.get("minimum") is not None:
                out["minimum"] = meta["minimum"]
    elif tp is str:
        out = {"type": "string"}
        if meta.get("choices"):
            out["enum"] = list(meta["choices"])
            if "off" in meta["choices"]:   # a bare `off` is false to YAML 1.1, and the loader takes it
                out = {"type": ["string", "boolean"], "enum": [*meta["choices"], False]}
        if meta.get("pattern"):
            # the loader's fullmatch: `$(?!\n)` ends the string in ECMA-262 and in Python's re alike
            # (Python's `$` alone also matches before a final line break)
            out["pattern"] = "^(?:" + meta["pattern"] + ")$(?!\n)"
    elif typing.get_origin(tp) is tuple:
        return {"type": "array", "items": {"type": "string"}}
    else:  # pragma: no cover
        raise TypeError(f"no schema for {tp!r}")
    if meta.get("maximum") is not None:
        out["maximum"] = meta["maximum"]
    return out
