"""The one decision sequence: which facts a request needs, in which order they are checked, report mode.

`evaluate(policy, route)` is a generator. It yields what it needs to go on and is
sent the answer; it returns the `Verdict`:

    NeedFields(names)       the body's form fields (names=None: every field), {name: [values]}
    NeedOrderSolicitor(id)  the order's solicitor as the upstream stores it, {source, identifier} or None

The pipeline drives it with the request body and the upstream (and applies the rate
limit once the operation itself is admitted, before any fact is fetched);
`gateway policy explain` and `gateway policy test` drive it with the values they
are given. Nothing here does I/O, so the order of checks is tested as a table of
scripted answers (tests/test_core_decide.py), and no two callers can disagree.

Report mode: a policy denial (403 or 404) of a `mode: report` policy does not stop
the sequence; the verdict allows, with `would_deny` naming the last such code.
Refusals that are not the policy's (a malformed solicitor, 400) are never relaxed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator

from gateway.core.errors import Reason
from gateway.core.operations import ORDER_SCOPED, Operation, Route
from gateway.core.policy import (
    Decision, Policy, decide_anonymize, decide_operation, decide_order_scope, decide_solicitor,
)
from gateway.core.strictjson import json_value

ANONYMIZE_FIELDS = ("internalId", "externalId", "ldapSearch")


@dataclass(frozen=True)
class NeedFields:
    """The body's form fields: {name: [values]}; `names` None means every field of the body.

    `would_deny` (report mode) is a denial already noted, so that a request refused while
    this need is met (a body that cannot be read) is counted as one that would be denied too.
    """

    names: tuple[str, ...] | None
    would_deny: Reason | None = None
    would_deny_reason: str = ""


@dataclass(frozen=True)
class NeedOrderSolicitor:
    """The solicitor of order `order_id` as the upstream stores it ({source, identifier}), or None if none."""

    order_id: str
    would_deny: Reason | None = None
    would_deny_reason: str = ""


Need = NeedFields | NeedOrderSolicitor


class Unknown:
    """An answer that says the fact is not known here (`policy explain` without the order's solicitor):
    the verdict is then conditional, and its reason says on what."""


UNKNOWN = Unknown()


@dataclass(frozen=True)
class Verdict:
    allow: bool
    status: int = 200                      # the status to answer when denied
    code: Reason | None = None             # the fixed reason code of a denial
    reason: str = "allowed by policy"      # for the client's problem detail, the audit line, explain
    would_deny: Reason | None = None       # report mode: the denial that was not enforced
    would_deny_status: int | None = None   # ... and the status it would have had
    solicitor: dict | None = None          # the solicitor decided on: the create form's, or the order's


def _solicitor_of(values: list[Any]) -> dict | None:
    if len(values) == 1 and isinstance(values[0], dict):
        return {"source": values[0].get("source"), "identifier": values[0].get("identifier")}
    return None


def evaluate(policy: Policy, route: Route) -> Generator[Need, Any, Verdict]:
    """The decision on one request to `route` by the client of `policy` (see the module's docstring)."""
    would_deny: list[Decision] = []

    def enforce(decision: Decision) -> Verdict | None:
        if decision.allow:
            return None
        if policy.mode == "report" and decision.status in (403, 404):
            would_deny.append(decision)
            return None
        return Verdict(False, decision.status, Reason(decision.code), decision.reason, solicitor=solicitor)

    solicitor: dict | None = None
    refused = enforce(decide_operation(policy, route.operation))
    if refused:
        return refused
    op = route.operation
    noted = {}
    if would_deny:
        noted = {"would_deny": Reason(would_deny[-1].code), "would_deny_reason": f"would deny: {would_deny[-1].reason}"}
    if op is Operation.CREATE_ORDER:
        fields = yield NeedFields(("solicitor",), **noted)
        values = [json_value(v) for v in fields.get("solicitor", [])]
        solicitor = _solicitor_of(values)
        decision = decide_solicitor(policy, values)
    elif op is Operation.ANONYMIZE_USER:
        fields = yield NeedFields(None, **noted)
        decision = decide_anonymize(policy, fields)
    elif op in ORDER_SCOPED:
        answer = yield NeedOrderSolicitor(route.order_id, **noted)
        if answer is UNKNOWN:
            listed = ", ".join(f"{s.source}:{s.identifier}" for s in policy.solicitors) or "none"
            decision = Decision.ok(f"allowed if the order's solicitor is one of: {listed}")
        else:
            solicitor = answer
            decision = decide_order_scope(policy, solicitor)
    else:  # pragma: no cover - every operation is one of the above
        decision = Decision.ok()
    refused = enforce(decision)
    if refused:
        return refused
    if would_deny:
        last = would_deny[-1]
        return Verdict(True, reason=f"would deny: {last.reason}", would_deny=Reason(last.code),
                       would_deny_status=last.status, solicitor=solicitor)
    return Verdict(True, reason=decision.reason, solicitor=solicitor)


def run(steps: Generator[Need, Any, Verdict], answer) -> Verdict:
    """Drive a decision to its verdict with a plain function answering each need (explain, policy test)."""
    try:
        need = next(steps)
        while True:
            need = steps.send(answer(need))
    except StopIteration as done:
        return done.value
