"""The create-order and anonymize requests: form fields -> validated values.

Pure functions over (name, text) pairs, so that every rule about missing,
repeated or malformed fields is tested without HTTP. Each failure names the
field it is about.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from gateway.core.strictjson import strict_json

SOURCES = ("INTERNAL", "EXTERNAL")
# The attributes the Signing Workflow server keeps about a person.
PERSON_ATTRIBUTES = ("givenName", "sn", "mail", "mobile")
MAX_SIGNERS = 50
MAX_TEXT = 4096
DUE_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}")
EXTERNAL_ID_RE = re.compile(r"[0-9A-Za-z+\-]{1,64}")


class FieldError(Exception):
    """A request field is missing, repeated or malformed (HTTP 400)."""

    def __init__(self, field: str, detail: str, status: int = 400):
        self.field, self.detail, self.status = field, detail, status
        super().__init__(f"{field}: {detail}")


@dataclass(frozen=True)
class PersonRef:
    """A solicitor or signer as the request names it."""

    source: str
    identifier: str
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NewOrder:
    title: str
    description: str
    due_local: str
    due_at: float
    solicitor: PersonRef
    signers: tuple[PersonRef, ...]
    tags: tuple[Any, ...]
    link_type: int
    options: tuple[dict, ...]


def _json_field(name: str, text: str) -> Any:
    try:
        return strict_json(text)
    except (ValueError, RecursionError) as exc:
        raise FieldError(name, f"is not valid JSON ({exc})") from None


def parse_person(name: str, value: Any) -> PersonRef:
    """A solicitor/signer/ldapSearch JSON object -> PersonRef."""
    if not isinstance(value, dict):
        raise FieldError(name, "must be a JSON object with source and identifier")
    unknown = set(value) - {"source", "identifier", "attributes"}
    if unknown:
        raise FieldError(name, f"unknown key(s) {', '.join(sorted(unknown))}")
    source, identifier = value.get("source"), value.get("identifier")
    if source not in SOURCES:
        raise FieldError(name, "source must be INTERNAL or EXTERNAL")
    if not isinstance(identifier, str) or not identifier or identifier != identifier.strip():
        raise FieldError(name, "identifier must be a non-empty string without surrounding spaces")
    if source == "INTERNAL":
        attr, eq, val = identifier.partition("=")
        if not eq or not attr or not val:
            raise FieldError(name, "an INTERNAL identifier is attribute=value, e.g. sAMAccountName=jdoe")
    elif not EXTERNAL_ID_RE.fullmatch(identifier):
        raise FieldError(name, "an EXTERNAL identifier is a personal number")
    return PersonRef(source, identifier, _parse_attributes(name, value.get("attributes")))


def _parse_attributes(name: str, raw: Any) -> dict[str, str]:
    if raw is None or raw == []:
        return {}
    if not isinstance(raw, dict):
        raise FieldError(name, "attributes must be a JSON object")
    attributes = {}
    for key, entry in raw.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("value"), str):
            raise FieldError(name, f'attribute {key!r} must be {{"value": "..."}}')
        if len(entry["value"]) > 256:
            raise FieldError(name, f"attribute {key!r} is too long")
        if key in PERSON_ATTRIBUTES:  # others are not kept: no personal data we do not need
            attributes[key] = entry["value"]
    return attributes


def _one(fields: dict[str, list[str]], name: str, required: bool = True) -> str | None:
    values = fields.get(name, [])
    if len(values) > 1:
        raise FieldError(name, "must appear once, not repeated")
    if not values:
        if required:
            raise FieldError(name, "is missing")
        return None
    if len(values[0]) > MAX_TEXT:
        raise FieldError(name, f"is longer than {MAX_TEXT} characters")
    return values[0]


def parse_due_date(text: str, tz: ZoneInfo, now: float) -> float:
    """YYYY-MM-DDThh:mm:ss in `tz` -> epoch seconds; must be a real local time in the future."""
    if not DUE_DATE_RE.fullmatch(text):
        raise FieldError("dueDate", "must be YYYY-MM-DDThh:mm:ss")
    try:
        naive = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        raise FieldError("dueDate", "is not a real date and time") from None
    local = naive.replace(tzinfo=tz)
    # A wall-clock time skipped by a daylight-saving change does not exist.
    if local.astimezone(ZoneInfo("UTC")).astimezone(tz).replace(tzinfo=None) != naive:
        raise FieldError("dueDate", f"does not exist in {tz.key} (daylight-saving gap)")
    due = local.timestamp()
    if due <= now:
        raise FieldError("dueDate", "is in the past")
    return due


CREATE_FIELDS = ("title", "description", "dueDate", "upload", "solicitor", "signers", "tags", "linkType", "option")


def parse_create(fields: dict[str, list[str]], tz: ZoneInfo, now: float) -> NewOrder:
    """The text fields of POST /orders (the upload is checked apart) -> NewOrder."""
    for name in fields:
        if name not in CREATE_FIELDS:
            raise FieldError(name, "is not a field of POST /orders")
    title = _one(fields, "title")
    if not title.strip():
        raise FieldError("title", "is empty")
    description = _one(fields, "description", required=False) or ""
    due_local = _one(fields, "dueDate")
    due_at = parse_due_date(due_local, tz, now)
    solicitor = parse_person("solicitor", _json_field("solicitor", _one(fields, "solicitor")))
    raw_signers = fields.get("signers", [])
    if not raw_signers:
        raise FieldError("signers", "is missing: at least one signer is needed")
    if len(raw_signers) > MAX_SIGNERS:
        raise FieldError("signers", f"at most {MAX_SIGNERS} signers")
    signers = tuple(parse_person("signers", _json_field("signers", s)) for s in raw_signers)
    tags = tuple(_json_field("tags", t) for t in fields.get("tags", []))
    link_text = _one(fields, "linkType", required=False)
    if link_text is None:
        link_type = 0
    elif link_text in ("0", "1"):
        link_type = int(link_text)
    else:
        raise FieldError("linkType", "must be 0 or 1")
    options = []
    for text in fields.get("option", []):
        opt = _json_field("option", text)
        if not isinstance(opt, dict) or set(opt) != {"name", "value"} or not isinstance(opt["name"], str):
            raise FieldError("option", 'must be {"name": "...", "value": ...}')
        if any(o["name"] == opt["name"] for o in options):
            raise FieldError("option", f"option {opt['name']!r} is given twice")
        options.append(opt)
    return NewOrder(title, description, due_local, due_at, solicitor, signers, tags, link_type, tuple(options))


@dataclass(frozen=True)
class AnonymizeTarget:
    """Exactly one way of naming the person to anonymize."""

    internal_id: str | None = None
    external_id: tuple[str, str] | None = None  # (source, identifier-or-userid)
    person: PersonRef | None = None


ANONYMIZE_FIELDS = ("internalId", "externalId", "ldapSearch")


def parse_anonymize(fields: dict[str, list[Any]]) -> AnonymizeTarget:
    """The fields of POST /anonymize (from a form or a JSON object) -> AnonymizeTarget."""
    for name in fields:
        if name not in ANONYMIZE_FIELDS:
            raise FieldError(name, "is not a field of POST /anonymize")
    given = [n for n in ANONYMIZE_FIELDS if fields.get(n)]
    if len(given) != 1:
        field = given[1] if given else "internalId"
        raise FieldError(field, "give exactly one of internalId, externalId, ldapSearch")
    name = given[0]
    values = fields[name]
    if len(values) > 1:
        raise FieldError(name, "must appear once, not repeated")
    value = values[0]
    if name == "internalId":
        try:
            return AnonymizeTarget(internal_id=str(uuid.UUID(str(value))))
        except ValueError:
            raise FieldError(name, "must be a UUID") from None
    if name == "externalId":
        source, sep, ident = str(value).partition(":")
        if not sep or source not in SOURCES or not ident:
            raise FieldError(name, "must be SOURCE:identifier, e.g. EXTERNAL:200001011907")
        return AnonymizeTarget(external_id=(source, ident))
    if isinstance(value, str):
        value = _json_field(name, value)
    return AnonymizeTarget(person=parse_person(name, value))
