"""The pure core of the reference API: form rules, order state rules, directory look-ups."""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import FUTURE_DUE, ROOT, SIGNER_EXTERNAL, SOLICITOR, STOCKHOLM
from gateway.reference.directory import Directory
from gateway.reference.forms import FieldError, PersonRef, parse_anonymize, parse_create, parse_due_date
from gateway.reference.orders import (
    Conflict, NoSuchSigner, SignerState, State, after_reject, after_sign, effective_state, require_pending,
)

NOW = time.time()


def fields(**overrides):
    base = {"title": ["T"], "dueDate": [FUTURE_DUE], "solicitor": [SOLICITOR], "signers": [SIGNER_EXTERNAL]}
    base.update({k: v for k, v in overrides.items() if v is not None})
    for k, v in overrides.items():
        if v is None:
            base.pop(k, None)
    return base


def field_error(**overrides) -> FieldError:
    with pytest.raises(FieldError) as info:
        parse_create(fields(**overrides), STOCKHOLM, NOW)
    return info.value


def test_valid_create_fields():
    order = parse_create(fields(tags=['"urgent"', '{"dept": "hr"}'], linkType=["1"],
                                option=['{"name": "notifyAllSigners", "value": true}']), STOCKHOLM, NOW)
    assert order.title == "T" and order.description == ""
    assert order.solicitor == PersonRef("INTERNAL", "sAMAccountName=cborgstrom", {})
    assert order.signers[0].attributes == {"mail": "anna@example.org", "mobile": "+46700000000"}
    assert order.tags == ("urgent", {"dept": "hr"})
    assert order.link_type == 1
    assert order.options == ({"name": "notifyAllSigners", "value": True},)


@pytest.mark.parametrize("overrides, field", [
    ({"title": None}, "title"),
    ({"title": ["a", "b"]}, "title"),
    ({"title": ["  "]}, "title"),
    ({"dueDate": None}, "dueDate"),
    ({"dueDate": ["2099-12-24"]}, "dueDate"),
    ({"dueDate": ["2099-02-30T00:00:00"]}, "dueDate"),
    ({"dueDate": ["2020-01-01T00:00:00"]}, "dueDate"),
    ({"dueDate": ["2099-12-24T00:00:00Z"]}, "dueDate"),
    ({"solicitor": None}, "solicitor"),
    ({"solicitor": [SOLICITOR, SOLICITOR]}, "solicitor"),
    ({"solicitor": ["{not json"]}, "solicitor"),
    ({"solicitor": ['["INTERNAL"]']}, "solicitor"),
    ({"solicitor": ['{"source":"INTERNAL","identifier":"a=b","source":"EXTERNAL"}']}, "solicitor"),
    ({"solicitor": ['{"source":"OTHER","identifier":"x"}']}, "solicitor"),
    ({"solicitor": ['{"source":"INTERNAL","identifier":"cborgstrom"}']}, "solicitor"),
    ({"solicitor": ['{"source":"EXTERNAL","identifier":"1986 0305"}']}, "solicitor"),
    ({"solicitor": ['{"source":"EXTERNAL","identifier":"1","attributes":{"mail":"x"}}']}, "solicitor"),
    ({"solicitor": ['{"source":"EXTERNAL","identifier":"1","extra":1}']}, "solicitor"),
    ({"signers": None}, "signers"),
    ({"signers": ['{"source":"EXTERNAL","identifier":NaN}']}, "signers"),
    ({"tags": ["not json"]}, "tags"),
    ({"linkType": ["2"]}, "linkType"),
    ({"linkType": ["0", "1"]}, "linkType"),
    ({"option": ['{"name":"a"}']}, "option"),
    ({"option": ['{"name":"a","value":1}', '{"name":"a","value":2}']}, "option"),
    ({"surprise": ["x"]}, "surprise"),
])
def test_bad_create_fields_name_the_field(overrides, field):
    assert field_error(**overrides).field == field


def test_due_date_is_read_in_the_configured_zone():
    # 2099-06-01 is summer time in Stockholm: UTC+2.
    due = parse_due_date("2099-06-01T12:00:00", STOCKHOLM, NOW)
    assert time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(due)) == "2099-06-01T10:00:00"


def test_due_date_in_a_daylight_saving_gap_does_not_exist():
    with pytest.raises(FieldError, match="daylight-saving"):
        parse_due_date("2099-03-29T02:30:00", STOCKHOLM, NOW)


def test_anonymize_fields():
    assert parse_anonymize({"internalId": ["256FEDCB-CC59-435B-B45B-D915F7C7A04A"]}).internal_id == (
        "256fedcb-cc59-435b-b45b-d915f7c7a04a")
    assert parse_anonymize({"externalId": ["INTERNAL:jane.doe"]}).external_id == ("INTERNAL", "jane.doe")
    target = parse_anonymize({"ldapSearch": [SOLICITOR]})
    assert target.person.identifier == "sAMAccountName=cborgstrom"
    assert parse_anonymize({"ldapSearch": [{"source": "EXTERNAL", "identifier": "200001011907"}]}).person


@pytest.mark.parametrize("given", [
    {},
    {"internalId": ["x"], "externalId": ["EXTERNAL:1"]},
    {"internalId": ["not-a-uuid"]},
    {"externalId": ["200001011907"]},
    {"externalId": ["OTHER:1"]},
    {"externalId": ["EXTERNAL:1", "EXTERNAL:2"]},
    {"ldapSearch": ["{bad"]},
    {"name": ["x"]},
])
def test_bad_anonymize_fields(given):
    with pytest.raises(FieldError):
        parse_anonymize(given)


def test_state_rules():
    p, s = SignerState.PENDING, SignerState.SIGNED
    assert after_sign([p, p], 0) == ([s, p], State.PENDING)
    assert after_sign([s, p], 1) == ([s, s], State.ACCEPTED)
    assert after_reject([s, p], 1) == ([s, SignerState.REJECTED], State.REJECTED)
    with pytest.raises(Conflict):
        after_sign([s, p], 0)
    with pytest.raises(NoSuchSigner):
        after_sign([p], 1)
    with pytest.raises(NoSuchSigner):
        after_reject([p], -1)
    for final in (State.ACCEPTED, State.REJECTED, State.CANCELLED, State.EXPIRED):
        with pytest.raises(Conflict):
            require_pending(final, "sign")
    require_pending(State.PENDING, "sign")


def test_expiry_rule():
    assert effective_state(State.PENDING, due_at=100, now=99) is State.PENDING
    assert effective_state(State.PENDING, due_at=100, now=100) is State.EXPIRED
    assert effective_state(State.ACCEPTED, due_at=100, now=200) is State.ACCEPTED


def test_directory_wins_and_request_fills_in():
    d = Directory.load(ROOT / "directory.yaml")
    ident, attrs = asyncio.run(
        d.resolve("signers", PersonRef("EXTERNAL", "200001011907", {"mail": "other@x", "mobile": "+4670"})))
    assert ident == "200001011907"
    assert attrs == {"givenName": "Erik", "sn": "Eriksson", "mail": "erik.eriksson@example.org", "mobile": "+4670"}
    ident, attrs = asyncio.run(
        d.resolve("solicitor", PersonRef("INTERNAL", "samaccountname=CBORGSTROM", {"givenName": "X"})))
    assert ident == "sAMAccountName=cborgstrom" and attrs["givenName"] == "Christer"
    ident, attrs = asyncio.run(d.resolve("signers", PersonRef("EXTERNAL", "191212121212", {"mail": "m@x"})))
    assert attrs == {"mail": "m@x"}


def test_unknown_internal_person_is_a_field_error():
    d = Directory.load(ROOT / "directory.yaml")
    with pytest.raises(FieldError) as info:
        asyncio.run(d.resolve("signers", PersonRef("INTERNAL", "sAMAccountName=nobody", {})))
    assert info.value.field == "signers"


def test_ambiguous_directory_match_is_refused():
    d = Directory(internal=[{"uid": "a", "mail": "same@x"}, {"uid": "b", "mail": "same@x"}])
    with pytest.raises(FieldError, match="matches 2") as info:
        asyncio.run(d.resolve("solicitor", PersonRef("INTERNAL", "mail=same@x", {})))
    assert info.value.status == 409
