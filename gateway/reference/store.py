"""SQLite storage of the reference API: logins, orders, signers, documents, events.

One file in WAL mode. Every change is one transaction, so an order never
exists without its document and a failed request leaves nothing behind.
Personal data lives only in `logins`; orders point at login rows, which is
what lets anonymization replace a person everywhere at once. The store is
synchronous and is called from one thread (see app.py); time is passed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from gateway.reference.forms import AnonymizeTarget, NewOrder
from gateway.reference.orders import (
    Conflict, Event, SignerState, State, after_reject, after_sign, effective_state, require_pending,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS logins (
    id INTEGER PRIMARY KEY,
    internal_id TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    identifier TEXT NOT NULL,
    given_name TEXT, surname TEXT, mail TEXT, mobile TEXT,
    created_at REAL NOT NULL,
    anonymized_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS logins_person ON logins(source, identifier) WHERE anonymized_at IS NULL;
CREATE TABLE IF NOT EXISTS orders (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    description TEXT NOT NULL,
    due_local TEXT NOT NULL,
    timezone TEXT NOT NULL,
    due_at REAL NOT NULL,
    state TEXT NOT NULL,
    link_type INTEGER NOT NULL,
    tags TEXT NOT NULL,
    options TEXT NOT NULL,
    solicitor_id INTEGER NOT NULL REFERENCES logins(id),
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_solicitor ON orders(solicitor_id);
CREATE TABLE IF NOT EXISTS order_signers (
    order_id TEXT NOT NULL REFERENCES orders(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    login_id INTEGER NOT NULL REFERENCES logins(id),
    state TEXT NOT NULL,
    acted_at REAL,
    PRIMARY KEY (order_id, idx)
);
CREATE INDEX IF NOT EXISTS order_signers_login ON order_signers(login_id);
CREATE TABLE IF NOT EXISTS documents (
    order_id TEXT PRIMARY KEY REFERENCES orders(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    original_sha256 TEXT NOT NULL,
    signatures INTEGER NOT NULL DEFAULT 0,
    content BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    order_id TEXT,
    type TEXT NOT NULL,
    at REAL NOT NULL,
    login_id INTEGER,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS events_order ON events(order_id);
"""

ANONYMIZED = "ANONYMIZED"


class NotFound(Exception):
    """No such order or person (HTTP 404)."""


@dataclass(frozen=True)
class Person:
    """A solicitor or signer after the directory look-up."""

    source: str
    identifier: str
    attributes: dict[str, str]


@dataclass(frozen=True)
class Document:
    name: str
    size: int
    sha256: str
    content: bytes


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def private_folder(path: Path) -> Path:
    """Create `path` if needed and make it its owner's alone (0700): orders hold names, phones, e-mails."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def private_file(path: Path) -> Path:
    """Create `path` if needed, mode 0600, and tighten it if an older version left it readable by others."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)
    return path


class Store:
    def __init__(self, path: Path):
        private_folder(path.parent)
        self.path = private_file(path)
        for journal in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if journal.exists():  # SQLite creates them with the database file's mode; older ones are tightened
                os.chmod(journal, 0o600)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- people -------------------------------------------------------------

    def _login(self, db: sqlite3.Connection, person: Person, now: float) -> int:
        a = person.attributes
        values = (a.get("givenName"), a.get("sn"), a.get("mail"), a.get("mobile"))
        row = db.execute(
            "SELECT id FROM logins WHERE source=? AND identifier=? AND anonymized_at IS NULL",
            (person.source, person.identifier),
        ).fetchone()
        if row:
            db.execute(
                "UPDATE logins SET given_name=coalesce(?, given_name), surname=coalesce(?, surname),"
                " mail=coalesce(?, mail), mobile=coalesce(?, mobile) WHERE id=?",
                (*values, row["id"]),
            )
            return row["id"]
        return db.execute(
            "INSERT INTO logins (internal_id, source, identifier, given_name, surname, mail, mobile, created_at)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (str(uuid.uuid4()), person.source, person.identifier, *values, now),
        ).lastrowid

    @staticmethod
    def _event(db, order_id: str | None, kind: Event, now: float, login_id: int | None = None, **detail) -> None:
        db.execute(
            "INSERT INTO events (order_id, type, at, login_id, detail) VALUES (?,?,?,?,?)",
            (order_id, kind.value, now, login_id, json.dumps(detail) if detail else None),
        )

    # -- orders -------------------------------------------------------------

    def create_order(
        self, order_id: str, order: NewOrder, timezone_name: str, solicitor: Person, signers: list[Person],
        document_name: str, document: bytes, now: float,
    ) -> str:
        digest = hashlib.sha256(document).hexdigest()
        with self._tx() as db:
            solicitor_id = self._login(db, solicitor, now)
            db.execute(
                "INSERT INTO orders (id, title, description, due_local, timezone, due_at, state, link_type, tags,"
                " options, solicitor_id, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (order_id, order.title, order.description, order.due_local, timezone_name, order.due_at,
                 State.PENDING.value, order.link_type, json.dumps(list(order.tags)), json.dumps(list(order.options)),
                 solicitor_id, now, now),
            )
            for idx, signer in enumerate(signers):
                db.execute(
                    "INSERT INTO order_signers (order_id, idx, login_id, state) VALUES (?,?,?,?)",
                    (order_id, idx, self._login(db, signer, now), SignerState.PENDING.value),
                )
            db.execute(
                "INSERT INTO documents (order_id, name, size, sha256, original_sha256, content) VALUES (?,?,?,?,?,?)",
                (order_id, document_name, len(document), digest, digest, document),
            )
            self._event(db, order_id, Event.CREATED, now, solicitor_id, sha256=digest, signers=len(signers))
        return order_id

    def _current(self, db: sqlite3.Connection, order_id: str, now: float) -> sqlite3.Row:
        """The order row, with a PENDING order past its due date turned EXPIRED (recorded once)."""
        row = db.execute("SELECT * FROM orders WHERE id=?", (order_id,)).fetchone()
        if row is None:
            raise NotFound(f"no order {order_id}")
        if effective_state(State(row["state"]), row["due_at"], now) is State.EXPIRED and row["state"] == "PENDING":
            db.execute("UPDATE orders SET state=?, updated_at=? WHERE id=?", (State.EXPIRED.value, now, order_id))
            self._event(db, order_id, Event.EXPIRED, now)
            row = db.execute("SELECT * FROM orders WHERE id=?", (order_id,)).fetchone()
        return row

    def state(self, order_id: str, now: float) -> State:
        with self._tx() as db:
            return State(self._current(db, order_id, now)["state"])

    def order(self, order_id: str, now: float) -> dict:
        """The whole order as the JSON of GET /orders/{id}."""
        with self._tx() as db:
            row = self._current(db, order_id, now)
            solicitor = db.execute("SELECT * FROM logins WHERE id=?", (row["solicitor_id"],)).fetchone()
            signer_rows = db.execute(
                "SELECT s.idx, s.state, s.acted_at, l.* FROM order_signers s JOIN logins l ON l.id = s.login_id"
                " WHERE s.order_id=? ORDER BY s.idx", (order_id,),
            ).fetchall()
            doc = db.execute(
                "SELECT name, size, sha256, original_sha256, signatures FROM documents WHERE order_id=?", (order_id,)
            ).fetchone()
        return {
            "id": row["id"],
            "title": row["title"],
            "description": row["description"],
            "dueDate": row["due_local"],
            "timezone": row["timezone"],
            "dueAt": iso(row["due_at"]),
            "state": row["state"],
            "linkType": row["link_type"],
            "tags": json.loads(row["tags"]),
            "options": json.loads(row["options"]),
            "solicitor": _person_json(solicitor),
            "signers": [
                {**_person_json(s), "index": s["idx"], "state": s["state"], "actedAt": iso(s["acted_at"])}
                for s in signer_rows
            ],
            "document": {
                "name": doc["name"], "size": doc["size"], "sha256": doc["sha256"],
                "originalSha256": doc["original_sha256"], "signatures": doc["signatures"],
            },
            "created": iso(row["created_at"]),
            "updated": iso(row["updated_at"]),
        }

    def document(self, order_id: str, now: float) -> Document:
        with self._tx() as db:
            self._current(db, order_id, now)
            doc = db.execute("SELECT name, size, sha256, content FROM documents WHERE order_id=?", (order_id,)).fetchone()
            self._event(db, order_id, Event.DOCUMENT_DOWNLOADED, now, sha256=doc["sha256"])
        return Document(doc["name"], doc["size"], doc["sha256"], bytes(doc["content"]))

    def delete(self, order_id: str, now: float) -> None:
        with self._tx() as db:
            self._current(db, order_id, now)
            db.execute("DELETE FROM orders WHERE id=?", (order_id,))
            self._event(db, order_id, Event.DELETED, now)

    # -- workflow -----------------------------------------------------------

    def _signers(self, db, order_id: str) -> list[sqlite3.Row]:
        return db.execute(
            "SELECT s.idx, s.state, s.login_id, l.given_name, l.surname, l.identifier FROM order_signers s"
            " JOIN logins l ON l.id = s.login_id WHERE s.order_id=? ORDER BY s.idx", (order_id,),
        ).fetchall()

    def sign(self, order_id: str, index: int, now: float, sign: Callable[[bytes, int, str], bytes]) -> State:
        """Signer `index` signs; `sign(pdf, index, signer_name)` adds the PDF signature."""
        with self._tx() as db:
            row = self._current(db, order_id, now)
            require_pending(State(row["state"]), "sign")
            rows = self._signers(db, order_id)
            new, state = after_sign([SignerState(r["state"]) for r in rows], index)
            signer = rows[index]
            name = " ".join(p for p in (signer["given_name"], signer["surname"]) if p) or signer["identifier"]
            content = db.execute("SELECT content FROM documents WHERE order_id=?", (order_id,)).fetchone()[0]
            signed = sign(bytes(content), index, name)
            db.execute(
                "UPDATE documents SET content=?, size=?, sha256=?, signatures=signatures+1 WHERE order_id=?",
                (signed, len(signed), hashlib.sha256(signed).hexdigest(), order_id),
            )
            self._act(db, order_id, index, new[index], state, now)
            self._event(db, order_id, Event.SIGNED, now, signer["login_id"], signer=index)
        return state

    def reject(self, order_id: str, index: int, now: float) -> State:
        with self._tx() as db:
            row = self._current(db, order_id, now)
            require_pending(State(row["state"]), "reject")
            rows = self._signers(db, order_id)
            new, state = after_reject([SignerState(r["state"]) for r in rows], index)
            self._act(db, order_id, index, new[index], state, now)
            self._event(db, order_id, Event.REJECTED, now, rows[index]["login_id"], signer=index)
        return state

    def cancel(self, order_id: str, now: float) -> State:
        with self._tx() as db:
            row = self._current(db, order_id, now)
            require_pending(State(row["state"]), "cancel")
            db.execute("UPDATE orders SET state=?, updated_at=? WHERE id=?", (State.CANCELLED.value, now, order_id))
            self._event(db, order_id, Event.CANCELLED, now, row["solicitor_id"])
        return State.CANCELLED

    @staticmethod
    def _act(db, order_id: str, index: int, signer_state: SignerState, state: State, now: float) -> None:
        db.execute(
            "UPDATE order_signers SET state=?, acted_at=? WHERE order_id=? AND idx=?",
            (signer_state.value, now, order_id, index),
        )
        db.execute("UPDATE orders SET state=?, updated_at=? WHERE id=?", (state.value, now, order_id))

    # -- anonymization ------------------------------------------------------

    def _find_logins(self, db, target: AnonymizeTarget) -> list[sqlite3.Row]:
        live = "anonymized_at IS NULL"
        if target.internal_id:
            return db.execute(
                f"SELECT * FROM logins WHERE lower(internal_id)=lower(?) AND {live}", (target.internal_id,)
            ).fetchall()
        if target.external_id:
            source, ident = target.external_id
            return db.execute(
                f"SELECT * FROM logins WHERE source=? AND {live} AND (lower(identifier)=lower(?)"
                " OR (source='INTERNAL' AND lower(substr(identifier, instr(identifier, '=') + 1))=lower(?)))",
                (source, ident, ident),
            ).fetchall()
        person = target.person
        return db.execute(
            f"SELECT * FROM logins WHERE source=? AND lower(identifier)=lower(?) AND {live}",
            (person.source, person.identifier),
        ).fetchall()

    def anonymize(self, target: AnonymizeTarget, now: float) -> list[str]:
        """Replace the person's names, phone, e-mail and internal UUID; return the new UUIDs."""
        with self._tx() as db:
            logins = self._find_logins(db, target)
            if not logins:
                raise NotFound("no such person")
            ids = [row["id"] for row in logins]
            marks = ",".join("?" * len(ids))
            order_ids = [r[0] for r in db.execute(
                f"SELECT id FROM orders WHERE state='PENDING' AND (solicitor_id IN ({marks}) OR id IN"
                f" (SELECT order_id FROM order_signers WHERE login_id IN ({marks})))", (*ids, *ids),
            )]
            pending = [o for o in order_ids if self._current(db, o, now)["state"] == State.PENDING.value]
            if pending:
                raise Conflict(f"the person has {len(pending)} PENDING order(s); delete or cancel them first")
            new_ids = []
            for login_id in ids:
                new_id = str(uuid.uuid4())
                db.execute(
                    "UPDATE logins SET internal_id=?, given_name=?, surname=?, mail=NULL, mobile=NULL,"
                    " anonymized_at=? WHERE id=?",
                    (new_id, ANONYMIZED, ANONYMIZED, now, login_id),
                )
                self._event(db, None, Event.USER_ANONYMIZED, now, login_id)
                new_ids.append(new_id)
        return new_ids

    # -- for tests and operators ---------------------------------------------

    def events(self, order_id: str | None = None) -> list[dict]:
        with self._lock:
            query = "SELECT order_id, type, at, login_id, detail FROM events"
            rows = self._db.execute(query + (" WHERE order_id=?" if order_id else "") + " ORDER BY id",
                                    (order_id,) if order_id else ()).fetchall()
        return [dict(r) for r in rows]


def _person_json(row: sqlite3.Row) -> dict:
    names = [n for n in (row["given_name"], row["surname"]) if n]
    return {
        "source": row["source"],
        "identifier": row["identifier"],
        "internalId": row["internal_id"],
        "givenName": row["given_name"],
        "surname": row["surname"],
        "name": " ".join(names) or None,
        "mail": row["mail"],
        "mobile": row["mobile"],
    }
