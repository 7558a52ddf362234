"""The decision sequence (core/decide.py) as a table: what it asks for, in which order, what it returns.

No sockets: each case scripts the answers to the needs, the way a Playbook tests
mitmproxy's layers, and checks the needs asked and the verdict.
"""

from __future__ import annotations

import pytest

from gateway.core.decide import UNKNOWN, NeedFields, NeedOrderSolicitor, evaluate
from gateway.core.errors import Reason
from gateway.core.operations import route
from gateway.core.policy import parse_policy

ORDER = "11111111-1111-4111-8111-111111111111"
HR = {"source": "INTERNAL", "identifier": "sAMAccountName=cborgstrom"}
EXT = {"source": "EXTERNAL", "identifier": "198603052385"}


def policy(**overrides):
    data = {"client": "svc", "match": {"common_name": "svc"},
            "allow": ["create_order", "read_order", "order_state", "download_document", "anonymize_user"],
            "solicitors": [{"source": "INTERNAL", "identifier": "sAMAccountName=*"}], "anonymize": ["EXTERNAL:19*"]}
    data.update(overrides)
    return parse_policy(data, "svc.yaml")


def play(pol, method: str, path: str, answers: list):
    """Drive evaluate with scripted answers; (needs asked, verdict)."""
    steps = evaluate(pol, route(method, path))
    asked, answers = [], list(answers)
    try:
        need = next(steps)
        while True:
            asked.append(need)
            need = steps.send(answers.pop(0))
    except StopIteration as done:
        assert not answers, f"answers left over: {answers}"
        return asked, done.value


J = '{"source":"INTERNAL","identifier":"sAMAccountName=cborgstrom"}'

CASES = [
    # (name, policy overrides, method, path, answers, needs asked (types), allow, status, code)
    ("operation not allowed: refused before any fact", {}, "DELETE", f"/orders/{ORDER}", [], [], False, 403,
     Reason.OPERATION_NOT_ALLOWED),
    ("create: asks for the solicitor field, allows its own", {}, "POST", "/orders", [{"solicitor": [J]}],
     [NeedFields], True, 200, None),
    ("create: another solicitor is 403", {}, "POST", "/orders",
     [{"solicitor": ['{"source":"EXTERNAL","identifier":"1"}']}], [NeedFields], False, 403,
     Reason.SOLICITOR_NOT_ALLOWED),
    ("create: missing is 400", {}, "POST", "/orders", [{}], [NeedFields], False, 400, Reason.BAD_SOLICITOR),
    ("create: twice is 400", {}, "POST", "/orders", [{"solicitor": [J, J]}], [NeedFields], False, 400,
     Reason.BAD_SOLICITOR),
    ("create: duplicate JSON keys are 400", {}, "POST", "/orders",
     [{"solicitor": ['{"source":"INTERNAL","source":"EXTERNAL","identifier":"x"}']}], [NeedFields], False, 400,
     Reason.BAD_SOLICITOR),
    ("order: asks for the order's solicitor", {}, "GET", f"/orders/{ORDER}/state", [HR], [NeedOrderSolicitor],
     True, 200, None),
    ("order: another solicitor's is 404", {}, "GET", f"/orders/{ORDER}", [EXT], [NeedOrderSolicitor], False, 404,
     Reason.ORDER_NOT_VISIBLE),
    ("order: an absent one is the same 404", {}, "GET", f"/orders/{ORDER}/document", [None],
     [NeedOrderSolicitor], False, 404, Reason.ORDER_NOT_VISIBLE),
    ("anonymize: asks for every field", {}, "POST", "/anonymize", [{"externalId": ["EXTERNAL:1986"]}],
     [NeedFields], True, 200, None),
    ("anonymize: outside the globs is 403", {}, "POST", "/anonymize", [{"externalId": ["EXTERNAL:2001"]}],
     [NeedFields], False, 403, Reason.ANONYMIZE_NOT_ALLOWED),
    ("anonymize: an unknown field is 400", {}, "POST", "/anonymize", [{"externalId": ["EXTERNAL:1986"], "x": [""]}],
     [NeedFields], False, 400, Reason.BAD_ANONYMIZE),
    ("report: a forbidden operation goes on to its facts, allowed, would deny", {"mode": "report"}, "DELETE",
     f"/orders/{ORDER}", [HR], [NeedOrderSolicitor], True, 200, None),
    ("report: the facts' own 400 is never relaxed", {"mode": "report"}, "POST", "/orders", [{}], [NeedFields],
     False, 400, Reason.BAD_SOLICITOR),
]


@pytest.mark.parametrize("name, overrides, method, path, answers, needs, allow, status, code", CASES,
                         ids=[c[0] for c in CASES])
def test_decision_table(name, overrides, method, path, answers, needs, allow, status, code):
    asked, verdict = play(policy(**overrides), method, path, answers)
    assert [type(n) for n in asked] == needs
    assert (verdict.allow, verdict.status if not verdict.allow else 200, verdict.code) == (allow, status, code)


def test_what_is_asked_names_the_fields_and_the_order():
    asked, _ = play(policy(), "POST", "/orders", [{"solicitor": [J]}])
    assert asked == [NeedFields(("solicitor",))]
    asked, _ = play(policy(), "GET", f"/orders/{ORDER}/state", [HR])
    assert asked == [NeedOrderSolicitor(ORDER)]
    asked, _ = play(policy(), "POST", "/anonymize", [{"internalId": ["u"]}])
    assert asked == [NeedFields(None)]


def test_report_mode_names_the_denial_it_did_not_enforce():
    asked, verdict = play(policy(mode="report", solicitors=[{"source": "EXTERNAL", "identifier": "*"}]),
                          "DELETE", f"/orders/{ORDER}", [HR])
    # noted when the operation was decided, before the fact was fetched; the last denial wins
    assert asked[0].would_deny is Reason.OPERATION_NOT_ALLOWED
    assert verdict.allow and verdict.would_deny is Reason.ORDER_NOT_VISIBLE and verdict.would_deny_status == 404
    assert verdict.reason == "would deny: no such order for this client"


def test_the_solicitor_decided_on_is_in_the_verdict():
    _, verdict = play(policy(), "POST", "/orders", [{"solicitor": [J]}])
    assert verdict.solicitor == HR
    _, verdict = play(policy(), "GET", f"/orders/{ORDER}", [EXT])
    assert verdict.solicitor == EXT and not verdict.allow


def test_an_unknown_order_solicitor_gives_a_conditional_verdict():
    _, verdict = play(policy(), "GET", f"/orders/{ORDER}/state", [UNKNOWN])
    assert verdict.allow and verdict.reason == "allowed if the order's solicitor is one of: INTERNAL:sAMAccountName=*"
