"""Request deadlines on one shared timer: they expire like asyncio.timeout, and only their own task."""

from __future__ import annotations

import asyncio

import pytest

from gateway.runtime.deadlines import TICK_S, Deadlines


async def guarded(deadlines: Deadlines, seconds: float, work):
    deadline = deadlines.start(seconds)
    try:
        return await work()
    except asyncio.CancelledError as exc:
        if deadline.settle():
            raise TimeoutError from exc
        raise
    finally:
        deadlines.end(deadline)


async def test_a_request_past_its_deadline_times_out_and_the_others_do_not():
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    started = loop.time()
    slow = asyncio.create_task(guarded(deadlines, 0.2, lambda: asyncio.sleep(30)))
    quick = asyncio.create_task(guarded(deadlines, 0.2, lambda: asyncio.sleep(0.05, "done")))
    later = asyncio.create_task(guarded(deadlines, 5, lambda: asyncio.sleep(0.5, "done")))
    with pytest.raises(TimeoutError):
        await slow
    assert 0.2 <= loop.time() - started < 0.2 + TICK_S + 0.2
    assert await quick == "done" and await later == "done"
    assert not slow.cancelling() and deadlines._live == {}  # the cancel was taken back; nothing left
    await asyncio.sleep(2 * TICK_S)
    assert deadlines._timer is None  # no timer runs while no request is in flight


async def test_a_cancel_from_outside_stays_a_cancel():
    deadlines = Deadlines()
    task = asyncio.create_task(guarded(deadlines, 30, lambda: asyncio.sleep(30)))
    await asyncio.sleep(0.01)
    task.cancel()  # the client went away, or the drain ran out
    with pytest.raises(asyncio.CancelledError):
        await task
    assert deadlines._live == {}


async def test_an_ended_deadline_never_fires():
    deadlines = Deadlines()

    async def ends_early():
        deadline = deadlines.start(0.05)
        deadlines.end(deadline)
        await asyncio.sleep(0.05 + 3 * TICK_S)  # past the deadline, which no longer guards anything
        return "finished"

    assert await ends_early() == "finished"


async def test_a_deadline_whose_cancel_was_swallowed_is_taken_back_all_the_same():
    deadlines = Deadlines()

    async def swallows():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return "swallowed"  # some code turns the cancel into something else

    task = asyncio.create_task(guarded(deadlines, 0.05, swallows))
    assert await task == "swallowed"
    assert task.cancelling() == 0  # as after asyncio.timeout: a later cancel or timeout counts from zero
