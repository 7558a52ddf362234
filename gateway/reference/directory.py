"""The user directory the reference API looks people up in (directory.yaml).

The real product asks the organisation's directory (AD, LDAP) and a
population register. Here both are one YAML file:

    internal:                # matched on the attribute an INTERNAL identifier names
      - {sAMAccountName: cborgstrom, givenName: Christer, sn: Borgström, mail: ..., mobile: ...}
    external:                # matched on the personal number of an EXTERNAL identifier
      - {personalNumber: "198603052385", givenName: Anna, sn: Andersson}

Attributes found in the directory win over attributes in the request; the
request only fills what the look-up lacks. An identifier that matches several
people is refused (409), never guessed. reference_api.directory may instead
name an LDAP server: ldap_directory.LdapDirectory, with the same interface.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from gateway.reference.forms import PERSON_ATTRIBUTES, FieldError, PersonRef


class DirectoryError(Exception):
    """The directory file cannot be used."""


class Resolving:
    """What every directory does with its `lookup`: the canonical identifier, request attributes filling gaps."""

    async def resolve(self, field: str, person: PersonRef) -> tuple[str, dict[str, str]]:
        """The canonical identifier and the directory's attributes, filled in from the request.

        An INTERNAL person who is not in the directory is a 400 naming `field`.
        """
        found = await self.lookup(field, person.source, person.identifier)
        if found is None:
            if person.source == "INTERNAL":
                raise FieldError(field, f"{person.identifier} is not in the user directory")
            return person.identifier, dict(person.attributes)
        identifier, attributes = found
        return identifier, {**person.attributes, **attributes}

    async def lookup(self, field: str, source: str, identifier: str) -> tuple[str, dict[str, str]] | None:
        raise NotImplementedError


class Directory(Resolving):
    def __init__(self, internal: list[dict[str, str]] = (), external: list[dict[str, str]] = ()):
        self._internal = [{k.casefold(): (k, str(v)) for k, v in e.items()} for e in internal]
        self._external = {str(e["personalNumber"]): e for e in external}

    @classmethod
    def load(cls, path: Path | None) -> "Directory":
        if path is None:
            return cls()
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise DirectoryError(f"{path}: cannot read the directory: {exc}") from None
        if not isinstance(data, dict) or set(data) - {"internal", "external"}:
            raise DirectoryError(f"{path}: expected a mapping with 'internal' and 'external' lists")
        internal, external = data.get("internal") or [], data.get("external") or []
        for where, entries in (("internal", internal), ("external", external)):
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise DirectoryError(f"{path}: {where} must be a list of mappings")
        if any("personalNumber" not in e for e in external):
            raise DirectoryError(f"{path}: every external entry needs a personalNumber")
        return cls(internal, external)

    async def ready(self) -> str | None:
        """A file read at start: always ready (the LDAP directory's probe answers why not)."""
        return None

    def close(self) -> None:
        pass

    async def lookup(self, field: str, source: str, identifier: str) -> tuple[str, dict[str, str]] | None:
        """(identifier as the directory spells it, the person's attributes), or None when not found.

        Async like LdapDirectory.lookup, so that the app awaits either the same way.
        """
        if source == "EXTERNAL":
            entry = self._external.get(identifier)
            return (identifier, _person_attributes(entry)) if entry else None
        attr, _, value = identifier.partition("=")
        hits = [
            e for e in self._internal
            if attr.casefold() in e and e[attr.casefold()][1].casefold() == value.casefold()
        ]
        if len(hits) > 1:
            raise FieldError(field, f"{identifier} matches {len(hits)} people in the directory", status=409)
        if not hits:
            return None
        key, found = hits[0][attr.casefold()]
        return f"{key}={found}", _person_attributes({k: v for k, v in hits[0].values()})

def _person_attributes(entry: dict) -> dict[str, str]:
    return {k: str(entry[k]) for k in PERSON_ATTRIBUTES if entry.get(k) not in (None, "")}
