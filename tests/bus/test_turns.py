"""LoopTurns: inline work takes turns on the event loop, round-robin between plugins."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from sandbus.bus.turns import LoopTurns


def _hold(seconds: float) -> None:
    """Inline work: holds the loop (a busy wait, like a plugin call run on it)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


async def test_work_within_the_slice_never_waits() -> None:
    turns = LoopTurns(slice_s=1.0)
    for _ in range(100):
        assert not turns.due()
        turns.begin()


async def test_turns_alternate_between_plugins_and_keep_order_within_one() -> None:
    """Two plugins with five queued calls each, every call longer than the slice: the loop alternates
    between them (a plugin with a backlog never holds another back), and each plugin's calls keep
    their order."""
    turns = LoopTurns(slice_s=0.001)
    ran: list[str] = []

    async def call(plugin: str, i: int) -> None:
        if turns.due():
            await turns.wait(plugin)
        turns.begin()
        _hold(0.002)
        ran.append(f"{plugin}{i}")

    tasks = [asyncio.ensure_future(call("a", i)) for i in range(5)]
    tasks += [asyncio.ensure_future(call("b", i)) for i in range(5)]
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert ran[0] == "a0"  # nobody waited yet: ran at once
    rest = ran[1:]
    assert [r for r in rest if r[0] == "a"] == ["a1", "a2", "a3", "a4"]
    assert [r for r in rest if r[0] == "b"] == ["b0", "b1", "b2", "b3", "b4"]
    # round-robin: while both have calls waiting, neither runs twice in a row
    assert all(x[0] != y[0] for x, y in itertools.pairwise(rest[:8])), rest


async def test_the_loop_runs_other_callbacks_between_turns() -> None:
    """Between two turns the loop gets round to everything else that is ready (the socket reader, the
    reply flusher): a callback scheduled behind a backlog runs after at most a couple of calls."""
    turns = LoopTurns(slice_s=0.001)
    ran: list[str] = []

    async def call(i: int) -> None:
        if turns.due():
            await turns.wait("busy")
        turns.begin()
        _hold(0.002)
        ran.append(f"call{i}")

    tasks = [asyncio.ensure_future(call(i)) for i in range(20)]
    await asyncio.sleep(0)  # the first call runs
    asyncio.get_running_loop().call_soon(ran.append, "other")
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert ran.index("other") <= 3, ran


async def test_a_cancelled_waiter_does_not_block_the_others() -> None:
    turns = LoopTurns(slice_s=0.001)
    turns.begin()
    _hold(0.002)
    assert turns.due()
    first = asyncio.ensure_future(turns.wait("a"))
    second = asyncio.ensure_future(turns.wait("a"))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 5)
    assert not turns._waiters
