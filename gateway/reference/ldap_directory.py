"""The user directory on an LDAP server (reference_api.directory: ldap[s]://host:port/BASE-DN).

An INTERNAL identifier `attribute=value` is one equality search for that
attribute under the base DN: the attribute must be a plain attribute name
(else 400) and the value is escaped as RFC 4515 says, so no identifier can
widen the search. The person's givenName, sn, mail and mobile come from the
entry; the request only fills what the entry lacks. No entry: handled as with
the YAML directory. Several entries: refused (409), never guessed.

A directory that cannot be reached (or refuses the bind) raises
DirectoryUnavailable, which the app answers 503: a look-up never falls back
to the request's attributes. Each look-up opens its own connection, so a
directory that comes back serves the next look-up without a restart.

ldap3 is synchronous: its calls run in a small thread pool, bounded by
timeout_s for the connect and for every answer (whole seconds, at least 1), so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import ssl
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit

from ldap3 import BASE, NONE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars

from gateway.reference.directory import Resolving
from gateway.reference.forms import PERSON_ATTRIBUTES, FieldError

ATTRIBUTE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,63}")
SIZE_LIMIT_EXCEEDED = 4


class DirectoryUnavailable(Exception):
    """The LDAP directory cannot be reached or refuses the look-up (HTTP 503)."""


def is_ldap_url(text: str | None) -> bool:
    return isinstance(text, str) and text.lower().startswith(("ldap://", "ldaps://"))


def equality_filter(attribute: str, value: str) -> str:
    """(attribute=value) with value escaped per RFC 4515: * ( ) \\ NUL -> \\2a \\28 \\29 \\5c \\00."""
    if not ATTRIBUTE_NAME_RE.fullmatch(attribute):
        raise ValueError(f"{attribute!r} is not an attribute name")
    return f"({attribute}={escape_filter_chars(value)})"


class LdapDirectory(Resolving):
    def __init__(self, url: str, bind_dn: str | None = None, password: str | None = None,
                 ca: Path | None = None, timeout_s: float = 5.0):
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("ldap", "ldaps") or not parts.hostname:
            raise ValueError(f"{url!r} is not an ldap:// or ldaps:// URL with a host")
        self.use_ssl = parts.scheme.lower() == "ldaps"
        self.host = parts.hostname
        self.port = parts.port or (636 if self.use_ssl else 389)
        self.base = unquote(parts.path.lstrip("/"))
        if not self.base:
            raise ValueError(f"{url!r} names no base DN (ldap://host:port/BASE-DN)")
        self.url = f"{parts.scheme.lower()}://{self.host}:{self.port}/{self.base}"
        self.bind_dn, self.password, self.ca, self.timeout_s = bind_dn, password, ca, timeout_s
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="reference-ldap")

    # -- the synchronous part, in the executor --------------------------------

    def _connect(self) -> Connection:
        tls = None
        if self.use_ssl:
            tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(self.ca) if self.ca else None)
        server = Server(self.host, port=self.port, use_ssl=self.use_ssl, tls=tls, get_info=NONE,
                        connect_timeout=self.timeout_s)
        conn = Connection(server, user=self.bind_dn, password=self.password, read_only=True,
                          receive_timeout=max(1, math.ceil(self.timeout_s)), raise_exceptions=False,
                          auto_referrals=False)
        try:
            if not conn.bind():
                raise DirectoryUnavailable(f"{self.url}: bind refused: {conn.result.get('description')}")
        except (LDAPException, OSError) as exc:
            raise DirectoryUnavailable(f"{self.url}: cannot reach the directory: {exc}") from None
        return conn

    @contextlib.contextmanager
    def _session(self) -> Iterator[Connection]:
        """A bound connection for one look-up; what goes wrong on the way is DirectoryUnavailable."""
        conn = self._connect()
        try:
            yield conn
        except (LDAPException, OSError) as exc:
            raise DirectoryUnavailable(f"{self.url}: cannot reach the directory: {exc}") from None
        finally:
            try:
                conn.unbind()
            except (LDAPException, OSError):
                pass

    def _search(self, filter_: str, attribute: str | None) -> list[dict]:
        wanted = [*PERSON_ATTRIBUTES, *([attribute] if attribute else [])]
        with self._session() as conn:
            conn.search(self.base, filter_, search_scope=SUBTREE, attributes=wanted, size_limit=2,
                        time_limit=max(1, int(self.timeout_s)))
            code = conn.result.get("result")
            if code not in (0, SIZE_LIMIT_EXCEEDED):
                raise DirectoryUnavailable(f"{self.url}: search failed: {conn.result.get('description')}")
            return [dict(e["attributes"]) for e in conn.response or [] if e.get("type") == "searchResEntry"]

    def _probe(self) -> None:
        with self._session() as conn:
            conn.search(self.base, "(objectClass=*)", search_scope=BASE, attributes=["1.1"])
            if conn.result.get("result") != 0:
                raise DirectoryUnavailable(f"{self.url}: base DN: {conn.result.get('description')}")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args))

    # -- the look-up interface (as Directory's) --------------------------------

    async def ready(self) -> str | None:
        """None when the directory answers a bind and a search of the base DN, else why not."""
        try:
            await self._run(self._probe)
        except DirectoryUnavailable as exc:
            return str(exc)
        return None

    async def lookup(self, field: str, source: str, identifier: str) -> tuple[str, dict[str, str]] | None:
        """(identifier as the directory spells it, the person's attributes), or None when not found.

        EXTERNAL people (a personal number) are not in the organisation's directory: None.
        """
        if source != "INTERNAL":
            return None
        attr, _, value = identifier.partition("=")
        try:
            filter_ = equality_filter(attr, value)
        except ValueError:
            raise FieldError(field, f"{attr!r} is not an LDAP attribute name") from None
        entries = await self._run(self._search, filter_, attr)
        if len(entries) > 1:
            raise FieldError(field, f"{identifier} matches several entries in the directory", status=409)
        if not entries:
            return None
        entry = entries[0]
        found = _values(entry, attr)
        spelled = next((v for v in found if v.casefold() == value.casefold()), found[0] if found else value)
        key = next((k for k in entry if k.casefold() == attr.casefold()), attr)
        attributes = {}
        for name in PERSON_ATTRIBUTES:
            values = _values(entry, name)
            if values and values[0]:
                attributes[name] = values[0]
        return f"{key}={spelled}", attributes

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _values(entry: dict, name: str) -> list[str]:
    for key, value in entry.items():
        if key.casefold() == name.casefold():
            values = value if isinstance(value, list) else [value]
            return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]
    return []
