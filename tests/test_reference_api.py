"""The reference Automation API over HTTP: each operation, whole order lives, expiry, anonymization."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest

from conftest import SIGNER_EXTERNAL, create_order, order_form
from gateway.reference.documents import sample_pdf

TABLES = ("logins", "orders", "order_signers", "documents", "events")


def db_counts(settings) -> dict[str, int]:
    with sqlite3.connect(settings.data_dir / "reference.sqlite3") as db:
        return {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}


def db_events(settings, order_id=None) -> list[tuple]:
    with sqlite3.connect(settings.data_dir / "reference.sqlite3") as db:
        rows = db.execute("SELECT order_id, type, login_id, detail FROM events ORDER BY id").fetchall()
    return [r for r in rows if order_id is None or r[0] == order_id]


async def text(ref, method, path, status=200):
    resp = await ref.request(method, path)
    body = await resp.text()
    assert resp.status == status, body
    return body


async def test_create_then_read_the_whole_order(ref, ref_settings):
    pdf = sample_pdf(5000)
    order_id = await create_order(ref, upload=pdf, tags=['"hr"'], linkType="1",
                                  option='{"name": "notifyAllSigners", "value": true}')
    resp = await ref.get(f"/orders/{order_id}")
    assert resp.status == 200 and resp.content_type == "application/json"
    order = await resp.json()
    assert order["id"] == order_id and order["state"] == "PENDING"
    assert order["title"] == "A new signing order"
    assert order["dueDate"] == "2099-12-24T00:00:00" and order["dueAt"] == "2099-12-23T23:00:00Z"
    assert order["linkType"] == 1 and order["tags"] == ["hr"]
    assert order["options"] == [{"name": "notifyAllSigners", "value": True}]
    solicitor = order["solicitor"]
    assert (solicitor["givenName"], solicitor["surname"], solicitor["mail"]) == (
        "Christer", "Borgström", "christer.borgstrom@example.com")
    internal, external = order["signers"]
    assert internal["internalId"] == solicitor["internalId"]  # one login a person
    assert external["name"] == "Anna Andersson"               # from the directory
    assert external["mail"] == "anna@example.org"              # the directory had none: from the request
    assert [s["state"] for s in order["signers"]] == ["PENDING", "PENDING"]
    assert order["document"] == {"name": "signthisplease.pdf", "size": len(pdf),
                                 "sha256": hashlib.sha256(pdf).hexdigest(),
                                 "originalSha256": hashlib.sha256(pdf).hexdigest(), "signatures": 0}
    assert await text(ref, "GET", f"/orders/{order_id}/state") == "PENDING"
    resp = await ref.get(f"/orders/{order_id}/document")
    assert resp.status == 200 and resp.content_type == "application/pdf"
    assert await resp.read() == pdf
    kinds = [e[1] for e in db_events(ref_settings, order_id)]
    assert kinds == ["created", "document_downloaded"]


async def test_delete_removes_the_order_and_keeps_its_events(ref, ref_settings):
    order_id = await create_order(ref)
    assert (await ref.delete(f"/orders/{order_id}")).status == 204
    for path in (f"/orders/{order_id}", f"/orders/{order_id}/state", f"/orders/{order_id}/document"):
        resp = await ref.get(path)
        assert resp.status == 404 and resp.content_type == "application/problem+json"
    assert (await ref.delete(f"/orders/{order_id}")).status == 404
    counts = db_counts(ref_settings)
    assert (counts["orders"], counts["order_signers"], counts["documents"]) == (0, 0, 0)
    assert [e[1] for e in db_events(ref_settings, order_id)] == ["created", "deleted"]


async def test_order_id_is_case_insensitive_guid(ref):
    order_id = await create_order(ref)
    assert await text(ref, "GET", f"/orders/{order_id.upper()}/state") == "PENDING"


@pytest.mark.parametrize("actions, final", [
    (["signers/0/sign", "signers/1/sign"], "ACCEPTED"),
    (["signers/1/sign", "signers/0/sign"], "ACCEPTED"),
    (["signers/0/sign", "signers/1/reject"], "REJECTED"),
    (["cancel"], "CANCELLED"),
])
async def test_life_of_an_order_to_each_final_state(ref, ref_settings, actions, final):
    order_id = await create_order(ref)
    for i, action in enumerate(actions):
        expected = final if i == len(actions) - 1 else "PENDING"
        assert await text(ref, "POST", f"/workflow/orders/{order_id}/{action}") == expected
    assert await text(ref, "GET", f"/orders/{order_id}/state") == final
    # A final state is final: every workflow action is now a conflict that changes nothing.
    before = db_counts(ref_settings)
    for action in ("signers/0/sign", "signers/1/reject", "cancel"):
        resp = await ref.post(f"/workflow/orders/{order_id}/{action}")
        assert resp.status == 409 and (await resp.json())["status"] == 409
    assert db_counts(ref_settings) == before
    assert await text(ref, "GET", f"/orders/{order_id}/state") == final
    order = await (await ref.get(f"/orders/{order_id}")).json()
    assert order["state"] == final
    if final == "ACCEPTED":
        assert [s["state"] for s in order["signers"]] == ["SIGNED", "SIGNED"]
        assert all(s["actedAt"] for s in order["signers"])
        assert order["document"]["signatures"] == 2
    kinds = {"ACCEPTED": "signed", "REJECTED": "rejected", "CANCELLED": "cancelled"}
    assert kinds[final] in [e[1] for e in db_events(ref_settings, order_id)]


async def test_signing_twice_and_unknown_signer(ref):
    order_id = await create_order(ref)
    assert await text(ref, "POST", f"/workflow/orders/{order_id}/signers/0/sign") == "PENDING"
    assert (await ref.post(f"/workflow/orders/{order_id}/signers/0/sign")).status == 409
    assert (await ref.post(f"/workflow/orders/{order_id}/signers/2/sign")).status == 404
    assert (await ref.post(f"/workflow/orders/{order_id}/signers/x/sign")).status == 400


async def test_expiry_reads_expired_and_is_recorded_once(ref, ref_settings, clock):
    order_id = await create_order(ref, dueDate="2099-01-01T00:00:00")
    clock.now = 4070905200 + 1  # 2099-01-01T00:00:01 in Stockholm (UTC+1)
    for _ in range(3):
        assert await text(ref, "GET", f"/orders/{order_id}/state") == "EXPIRED"
    assert (await ref.post(f"/workflow/orders/{order_id}/signers/0/sign")).status == 409
    assert [e[1] for e in db_events(ref_settings, order_id)] == ["created", "expired"]
    order = await (await ref.get(f"/orders/{order_id}")).json()
    assert order["state"] == "EXPIRED"


async def test_anonymize_refused_while_pending_then_replaces_the_person(ref, ref_settings):
    order_id = await create_order(ref)
    resp = await ref.post("/anonymize", data={"externalId": "EXTERNAL:198603052385"})
    assert resp.status == 409
    before = await (await ref.get(f"/orders/{order_id}")).json()
    await text(ref, "POST", f"/workflow/orders/{order_id}/signers/0/sign")
    await text(ref, "POST", f"/workflow/orders/{order_id}/signers/1/sign")
    document = await (await ref.get(f"/orders/{order_id}/document")).read()
    events = db_events(ref_settings)

    resp = await ref.post("/anonymize", data={"externalId": "EXTERNAL:198603052385"})
    assert resp.status == 200 and await resp.json() == {"anonymized": 1}

    after = await (await ref.get(f"/orders/{order_id}")).json()
    old, new = before["signers"][1], after["signers"][1]
    assert new["internalId"] != old["internalId"]
    assert (new["givenName"], new["surname"], new["mail"], new["mobile"]) == ("ANONYMIZED", "ANONYMIZED", None, None)
    assert after["signers"][0] == {**before["signers"][0], "state": "SIGNED", "actedAt": after["signers"][0]["actedAt"]}
    # Signatures inside documents and the events table stay as they were.
    assert await (await ref.get(f"/orders/{order_id}/document")).read() == document
    assert db_events(ref_settings)[: len(events)] == events
    assert db_events(ref_settings)[len(events)][1] == "user_anonymized"
    with sqlite3.connect(ref_settings.data_dir / "reference.sqlite3") as db:
        dump = "\n".join(db.iterdump())
    for value in ("Anna", "Andersson", "anna@example.org", "+46700000000", old["internalId"]):
        assert value not in dump
    # The person is gone: a second anonymization finds no one.
    assert (await ref.post("/anonymize", data={"externalId": "EXTERNAL:198603052385"})).status == 404


async def test_anonymize_by_internal_id_and_by_ldap_search(ref):
    order_id = await create_order(ref)
    await text(ref, "POST", f"/workflow/orders/{order_id}/cancel")
    order = await (await ref.get(f"/orders/{order_id}")).json()
    resp = await ref.post("/anonymize", json={"internalId": order["solicitor"]["internalId"].upper()})
    assert resp.status == 200, await resp.text()
    resp = await ref.post("/anonymize", json={"ldapSearch": json.loads(SIGNER_EXTERNAL)})
    assert resp.status == 200, await resp.text()
    after = await (await ref.get(f"/orders/{order_id}")).json()
    assert after["solicitor"]["givenName"] == "ANONYMIZED"
    assert after["signers"][1]["givenName"] == "ANONYMIZED"


async def test_anonymize_internal_by_user_id_after_expiry(ref, clock):
    await create_order(ref, dueDate="2099-01-01T00:00:00")
    assert (await ref.post("/anonymize", data={"externalId": "INTERNAL:cborgstrom"})).status == 409
    clock.now = 4070905200 + 1
    resp = await ref.post("/anonymize", data={"externalId": "INTERNAL:cborgstrom"})
    assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("body", [
    {"externalId": "EXTERNAL:190001010000"},
    {"internalId": "256FEDCB-CC59-435B-B45B-D915F7C7A04A"},
    {"ldapSearch": {"source": "INTERNAL", "identifier": "sAMAccountName=jane.doe"}},
])
async def test_anonymize_unknown_person_is_404(ref, body):
    resp = await ref.post("/anonymize", json=body)
    assert resp.status == 404 and resp.content_type == "application/problem+json"


async def test_form_fields_may_come_in_any_order(ref):
    form = order_form()
    form._fields.reverse()
    resp = await ref.post("/orders", data=form)
    assert resp.status == 200, await resp.text()
