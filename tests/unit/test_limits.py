"""The call gate (service.limits.CallGate), protocol-neutral: the concurrency limit, holding
calls while draining, and the drain itself."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.limits import BUSY, DRAINING, CallGate


@pytest.mark.parametrize("limit", [0, None])
def test_no_limit(limit: int | None) -> None:
    gate = CallGate(limit)
    gate.active = 10_000
    assert gate.limit is None and gate.admit() is None


def test_the_limit() -> None:
    gate = CallGate(2)
    before = time.monotonic()
    assert gate.admit() is None and gate.last_call >= before
    gate.active = 2  # callers count themselves in while they run
    assert gate.admit() == BUSY and gate.admit() == BUSY and gate.refused == 2
    assert gate.busy_message() == (
        "the server is busy: 2 calls in progress, its max_concurrent_requests limit; retry with backoff"
    )
    gate.active = 1
    assert gate.admit() is None


def test_draining_holds_calls_until_released_or_just_before_their_deadline() -> None:
    async def scenario() -> tuple:
        gate = CallGate(2)
        gate.start_draining()
        assert gate.admit() == DRAINING
        held = [asyncio.ensure_future(gate.hold(None)) for _ in range(3)]  # the third is over the cap
        for _ in range(3):  # let each run up to its wait (or its return)
            await asyncio.sleep(0)
        states = ([h.done() for h in held], gate.held)
        gate.release_held()
        await asyncio.gather(*held)
        other = CallGate(2)
        other.start_draining()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await other.hold(0.15)  # a caller with 0.15 s left is answered 0.1 s before its deadline
        waited = loop.time() - start
        return states, waited, gate.held, gate.refused

    (done, held_count), waited, held_after, refused = asyncio.run(scenario())
    assert done == [False, False, True] and held_count == 2  # the third, over the cap, answered at once
    assert waited >= 0.05  # never released: it waited for its own deadline less the margin
    assert held_after == 0 and refused == 3


def test_drain_waits_for_running_calls() -> None:
    async def scenario() -> tuple:
        gate = CallGate(4)
        idle = await gate.drain(timeout=5, quiet=0.01)
        busy = CallGate(4)
        busy.active = 1

        async def finish() -> None:
            await asyncio.sleep(0.1)
            busy.active = 0

        task = asyncio.ensure_future(finish())
        start = time.monotonic()
        figures = await busy.drain(timeout=5, quiet=0.01)
        waited = time.monotonic() - start
        await task
        stuck = CallGate(4)
        stuck.active = 1
        timed_out = await stuck.drain(timeout=0.05)
        return idle, figures, waited, timed_out, busy.admit()

    idle, figures, waited, timed_out, after = asyncio.run(scenario())
    assert idle["running_at_signal"] == 0 and idle["still_running"] == 0
    assert figures["running_at_signal"] == 1 and figures["still_running"] == 0 and waited >= 0.09
    assert timed_out["still_running"] == 1 and timed_out["drain_seconds"] >= 0.05
    assert after == DRAINING  # a drained gate holds every new call
