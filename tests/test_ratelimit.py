"""Rate-limit arithmetic (GCRA), `combine`, `limits_for`, MemoryStorage and the headers, with explicit clocks.

The rates here are chosen so that the emission interval is exact in binary
(per_second 2 -> 0.5 s, per_minute 6 -> 10 s) and the sums are exact; other
tests use inexact intervals (per_second 3, 10) to show rounding never refuses a
request the limit allows.
"""

from __future__ import annotations

import pytest

from conftest import Clock
from gateway.core.operations import Operation
from gateway.core.policy import CLIENT_RE, Rate, parse_policy
from gateway.core.ratelimit import UNMAPPED, UNMAPPED_KEY, Verdict, combine, gcra, limits_for, refused_limits
from gateway.shell.limits import MemoryStorage

TWO_A_SECOND_BURST_4 = Rate(rate=2.0, burst=4)      # interval 0.5 s, bucket 2 s
SIX_A_MINUTE_BURST_6 = Rate(rate=6 / 60, burst=6)   # interval 10 s, bucket 60 s


def run(rate: Rate, now: float, n: int, tat: float | None = None):
    """`n` GCRA steps at the same instant; the results and the final TAT."""
    tat = now if tat is None else tat
    out = []
    for _ in range(n):
        allowed, new_tat, remaining, reset, retry = gcra(tat, now, rate)
        out.append((allowed, remaining, reset, retry))
        tat = new_tat
    return out, tat


# -- one cell ---------------------------------------------------------------------


def test_burst_then_refusal():
    steps, _ = run(TWO_A_SECOND_BURST_4, 100.0, 6)
    assert [s[0] for s in steps] == [True, True, True, True, False, False]


def test_remaining_counts_down_to_zero_and_stays_there():
    steps, _ = run(TWO_A_SECOND_BURST_4, 100.0, 6)
    assert [s[1] for s in steps] == [3, 2, 1, 0, 0, 0]


def test_reset_is_the_time_until_the_bucket_is_full_again():
    steps, _ = run(TWO_A_SECOND_BURST_4, 100.0, 5)
    assert [s[2] for s in steps] == [0.5, 1.0, 1.5, 2.0, 2.0]  # refused: unchanged, 2 s to drain


def test_retry_after_is_zero_when_allowed_and_one_interval_when_just_full():
    steps, _ = run(TWO_A_SECOND_BURST_4, 100.0, 5)
    assert [s[3] for s in steps[:4]] == [0.0] * 4
    assert steps[4][3] == pytest.approx(0.5)


def test_retry_after_shrinks_as_time_passes():
    _, tat = run(SIX_A_MINUTE_BURST_6, 1000.0, 6)
    allowed, _, _, reset, retry = gcra(tat, 1000.0, SIX_A_MINUTE_BURST_6)
    assert (allowed, reset, retry) == (False, 60.0, 10.0)
    allowed, _, _, reset, retry = gcra(tat, 1004.0, SIX_A_MINUTE_BURST_6)
    assert (allowed, reset, retry) == (False, 56.0, 6.0)


def test_refused_step_keeps_the_tat():
    _, tat = run(TWO_A_SECOND_BURST_4, 100.0, 4)
    allowed, new_tat, *_ = gcra(tat, 100.0, TWO_A_SECOND_BURST_4)
    assert not allowed and new_tat == tat == 102.0


def test_refill_at_the_rate():
    rate = TWO_A_SECOND_BURST_4
    _, tat = run(rate, 100.0, 4)
    # just before one interval has passed: still refused
    assert gcra(tat, 100.49, rate)[0] is False
    # after one interval exactly one more request passes
    steps, tat = run(rate, 100.5, 2, tat)
    assert [s[0] for s in steps] == [True, False]
    # after one more second, two more
    steps, tat = run(rate, 101.5, 3, tat)
    assert [s[0] for s in steps] == [True, True, False]


def test_full_refill_after_the_bucket_drains_and_no_credit_beyond_burst():
    rate = TWO_A_SECOND_BURST_4
    _, tat = run(rate, 100.0, 4)
    steps, _ = run(rate, 102.0, 5, tat)          # exactly drained
    assert [s[0] for s in steps] == [True] * 4 + [False]
    steps, _ = run(rate, 10_000.0, 6, tat)       # idle for hours: still only the burst
    assert [s[0] for s in steps] == [True] * 4 + [False, False]
    assert steps[0][1] == 3


def test_steady_requests_at_the_rate_are_never_refused():
    rate = Rate(rate=1.0, burst=1)
    tat, now = 50.0, 50.0
    for _ in range(20):
        allowed, tat, remaining, _, _ = gcra(tat, now, rate)
        assert allowed and remaining == 0
        now += 1.0
    # but twice as fast is refused every other time
    results = []
    for _ in range(10):
        allowed, tat, *_ = gcra(tat, now, rate)
        results.append(allowed)
        now += 0.5
    assert results == [True, False] * 5


@pytest.mark.parametrize("now,count,period,burst", [
    (0.0, 10, 1, 20),       # the documented example limit: 19 pass
    (0.0, 7, 60, 20),       # 19 pass
    (1000.0, 3, 1, 3),      # 2 pass
    (1000.0, 3, 1, 1),      # none pass, ever, at this clock value
    (123456.0, 10, 1, 1),   # none pass
])
def test_burst_is_exact_for_any_rate_and_clock(now, count, period, burst):
    steps, _ = run(Rate(rate=count / period, burst=burst), now, burst + 1)
    assert [s[0] for s in steps] == [True] * burst + [False]


def test_requests_well_under_the_rate_always_pass_with_burst_one():
    clock = Clock(1000.0)
    storage = MemoryStorage(clock=clock)
    refused = 0
    for _ in range(200):
        clock.advance(0.5)
        refused += not storage.check_now([("crm", Rate(rate=3.0, burst=1))]).allowed
    assert refused == 0


# -- several cells -------------------------------------------------------------


def test_combine_allows_and_advances_every_cell():
    a, b = Rate(1.0, 10), Rate(1.0, 3)
    verdict, tats = combine(10.0, [(10.0, a), (10.0, b)])
    assert verdict.allowed
    assert tats == [11.0, 11.0]
    assert verdict.remaining == 2 and verdict.limit == 3  # the tighter limit binds


def test_combine_refused_by_one_cell_consumes_none():
    client, op = Rate(1.0, 10), Rate(1.0, 1)
    verdict, tats = combine(10.0, [(10.0, client), (11.0, op)])  # op cell is full
    assert not verdict.allowed
    assert tats == [10.0, 11.0]                 # unchanged, the client cell is not used up
    assert verdict.remaining == 0
    assert verdict.retry_after_s == pytest.approx(1.0)


def test_combine_reports_the_refusing_limit_even_when_it_is_larger():
    big, small = Rate(1.0, 10), Rate(1.0, 3)
    verdict, _ = combine(0.0, [(0.0, small), (10.0, big)])  # big is full, small has 2 left after this
    assert not verdict.allowed
    assert verdict.limit == 10
    assert verdict.remaining == 0


def test_combine_retry_after_is_the_longest_wait():
    verdict, _ = combine(0.0, [(2.0, Rate(1.0, 2)), (30.0, Rate(0.1, 3))])  # both full
    assert not verdict.allowed
    assert verdict.retry_after_s == pytest.approx(10.0)


def test_reset_belongs_to_the_binding_limit():
    client, op = Rate(1 / 60, 10), Rate(1.0, 2)   # intervals 60 s and 1 s
    verdict, _ = combine(0.0, [(0.0, client), (0.0, op)])
    assert verdict.allowed and verdict.limit == 2 and verdict.remaining == 1
    assert verdict.reset_s == pytest.approx(1.0)


# -- MemoryStorage ---------------------------------------------------------------


def test_memory_storage_burst_refusal_and_refill_with_injected_clock():
    clock = Clock(5000.0)
    storage = MemoryStorage(clock=clock)
    cells = [("crm", TWO_A_SECOND_BURST_4)]
    verdicts = [storage.check_now(cells) for _ in range(5)]
    assert [v.allowed for v in verdicts] == [True] * 4 + [False]
    assert [v.remaining for v in verdicts] == [3, 2, 1, 0, 0]
    assert verdicts[-1].retry_after_s == pytest.approx(0.5)
    clock.advance(0.5)
    assert storage.check_now(cells).allowed
    assert not storage.check_now(cells).allowed
    clock.advance(2.0)
    assert [storage.check_now(cells).allowed for _ in range(5)] == [True] * 4 + [False]


def test_memory_storage_keys_are_separate():
    storage = MemoryStorage(clock=Clock(0.0))
    rate = Rate(1.0, 1)
    assert storage.check_now([("crm", rate)]).allowed
    assert not storage.check_now([("crm", rate)]).allowed
    assert storage.check_now([("hr-system", rate)]).allowed


def test_memory_storage_refused_op_limit_does_not_use_up_client_limit():
    storage = MemoryStorage(clock=Clock(0.0))
    client = ("crm", Rate(1 / 60, 3))
    state = ("crm:order_state", Rate(1 / 60, 1))
    assert storage.check_now([client, state]).allowed
    for _ in range(5):
        assert not storage.check_now([client, state]).allowed
    # the five refusals did not count against the client: two more calls of another operation pass
    assert [storage.check_now([client]).allowed for _ in range(3)] == [True, True, False]


async def test_memory_storage_async_check_and_ping():
    storage = MemoryStorage(clock=Clock(0.0))
    verdict = await storage.check([("crm", Rate(1.0, 2))])
    assert verdict == Verdict(True, 2, 1, 1.0, 0.0)
    assert await storage.ping() is None
    await storage.close()


# -- headers ---------------------------------------------------------------------


def test_headers_when_allowed_have_no_retry_after():
    headers = Verdict(True, 20, 7, 3.2, 0.0).headers()
    assert headers == {"RateLimit-Limit": "20", "RateLimit-Remaining": "7", "RateLimit-Reset": "4"}


@pytest.mark.parametrize("retry,expected", [(0.0, "1"), (1e-9, "1"), (0.2, "1"), (1.0, "1"), (2.1, "3"),
                                            (10.0, "10")])
def test_headers_when_refused_have_whole_retry_after_of_at_least_one(retry, expected):
    headers = Verdict(False, 6, 0, 60.0, retry).headers()
    assert headers["Retry-After"] == expected
    assert headers["RateLimit-Remaining"] == "0" and headers["RateLimit-Reset"] == "60"


@pytest.mark.parametrize("reset,expected", [(0.0, "0"), (-0.5, "0"), (0.01, "1"), (59.5, "60")])
def test_headers_reset_is_a_whole_non_negative_number(reset, expected):
    assert Verdict(True, 6, 5, reset, 0.0).headers()["RateLimit-Reset"] == expected


def test_headers_from_a_real_refusal_are_integers():
    storage = MemoryStorage(clock=Clock(0.0))
    cells = [("crm", SIX_A_MINUTE_BURST_6)]
    for _ in range(6):
        storage.check_now(cells)
    headers = storage.check_now(cells).headers()
    assert {k: int(v) for k, v in headers.items()} == {
        "RateLimit-Limit": 6, "RateLimit-Remaining": 0, "RateLimit-Reset": 60, "Retry-After": 10}
    assert all(v.isdigit() for v in headers.values())


# -- limits_for ------------------------------------------------------------------


def policy(rate_limit=None):
    data = {"client": "crm", "match": {"common_name": "crm"}, "allow": ["order_state", "read_order"],
            "solicitors": [{"source": "EXTERNAL", "identifier": "*"}]}
    if rate_limit is not None:
        data["rate_limit"] = rate_limit
    return parse_policy(data, "crm.yaml")


def test_limits_for_client_only():
    p = policy({"per_second": 10, "burst": 20})
    assert limits_for(p, Operation.ORDER_STATE) == [("crm", Rate(10.0, 20))]
    assert limits_for(p, Operation.READ_ORDER) == [("crm", Rate(10.0, 20))]


def test_limits_for_operation_only():
    p = policy({"operations": {"order_state": {"per_minute": 60, "burst": 5}}})
    assert limits_for(p, Operation.ORDER_STATE) == [("crm:order_state", Rate(1.0, 5))]
    assert limits_for(p, Operation.READ_ORDER) == []


def test_limits_for_client_and_operation():
    p = policy({"per_hour": 3600, "burst": 100, "operations": {"order_state": {"per_second": 2}}})
    assert limits_for(p, Operation.ORDER_STATE) == [("crm", Rate(1.0, 100)), ("crm:order_state", Rate(2.0, 2))]
    assert limits_for(p, Operation.READ_ORDER) == [("crm", Rate(1.0, 100))]


def test_limits_for_none():
    assert limits_for(policy(), Operation.ORDER_STATE) == []
    assert limits_for(policy({}), Operation.ORDER_STATE) == []


def test_refused_requests_count_against_the_client_limit_only():
    p = policy({"per_second": 10, "burst": 20, "operations": {"order_state": {"per_second": 2}}})
    assert refused_limits(p) == [("crm", Rate(10.0, 20))]
    assert refused_limits(policy({"operations": {"order_state": {"per_second": 2}}})) == [("!refused:crm", UNMAPPED)]


def test_certificates_of_no_policy_share_one_cell_no_client_can_own():
    assert refused_limits(None) == [(UNMAPPED_KEY, UNMAPPED)]
    assert not CLIENT_RE.fullmatch(UNMAPPED_KEY)
