"""The manual clock the tier drives the coordinator with."""

from __future__ import annotations

import asyncio

import pytest

from tests.inproc.clock import ManualClock

pytestmark = pytest.mark.inproc


async def test_sleepers_wake_when_time_passes_their_deadline_and_advance_waits_for_their_next_sleep() -> None:
    clock = ManualClock(start_ns=1_000)
    ticks: list[float] = []

    async def every_second() -> None:
        while True:
            await clock.sleep(1.0)
            await asyncio.sleep(0)  # some work that yields before the next sleep
            ticks.append(clock.monotonic())

    task = asyncio.create_task(every_second())
    await asyncio.sleep(0)
    assert clock.sleeping() == 1
    await clock.advance(0.5)
    assert ticks == []
    await clock.advance(0.5)
    assert len(ticks) == 1  # advance returned after the woken loop's pass
    await clock.advance(10)
    assert len(ticks) == 2  # one jump is one pass, however long
    assert clock.time_ns() == 1_000 + 11 * 10**9
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert clock.sleeping() == 0  # a cancelled sleeper leaves
    await clock.advance(5)  # with nobody asleep: time moves, nothing to wait for


async def test_advance_also_returns_when_a_woken_task_ends_instead_of_sleeping_again() -> None:
    clock = ManualClock()
    task = asyncio.create_task(clock.sleep(3))
    await asyncio.sleep(0)
    await clock.advance(3)
    assert task.done()
