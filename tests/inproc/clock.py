"""A clock that moves only when the test moves it (the coordinator's `Clock`, see coordinator/clock.py)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

SETTLE_TIMEOUT_S = 10.0


@dataclass
class _Sleeper:
    deadline: float  # on this clock's monotonic scale
    wake: asyncio.Future[None]
    task: asyncio.Task[object] | None


class ManualClock:
    def __init__(self, start_ns: int | None = None) -> None:
        # Starts at the real time: rows the agent stamps (log lines, updates) read as plausible.
        self._ns = time.time_ns() if start_ns is None else start_ns
        self._mono = 1000.0
        self._sleepers: list[_Sleeper] = []
        self._slept = asyncio.Event()  # a task went (back) to sleep on this clock, or ended

    # ---- the Clock protocol --------------------------------------------------------------------
    def time_ns(self) -> int:
        return self._ns

    def monotonic(self) -> float:
        return self._mono

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        s = _Sleeper(self._mono + seconds, asyncio.get_running_loop().create_future(), asyncio.current_task())
        self._sleepers.append(s)
        self._slept.set()
        try:
            await s.wake
        finally:
            if s in self._sleepers:  # cancelled before its time
                self._sleepers.remove(s)

    # ---- the test's side -----------------------------------------------------------------------
    def sleeping(self) -> int:
        """How many tasks wait on this clock now."""
        return len(self._sleepers)

    def step_wall(self, seconds: float) -> None:
        """Steps the wall clock only (NTP, `date -s`): the monotonic clock and sleepers do not move."""
        self._ns += int(seconds * 1e9)

    def step(self, seconds: float) -> None:
        """Moves both clocks forward without waking anyone: the sleepers whose time came wake at the next
        `advance` (a periodic loop that could not run meanwhile, e.g. one waiting on a blocked DB thread)."""
        self._ns += int(seconds * 1e9)
        self._mono += seconds

    async def advance(self, seconds: float) -> None:
        """Moves time forward and returns once every task whose sleep ended has slept again (or ended).

        A periodic loop woken here has then done its pass: the test sees its effects without waiting.
        """
        self._ns += int(seconds * 1e9)
        self._mono += seconds
        due = [s for s in self._sleepers if s.deadline <= self._mono]
        self._sleepers = [s for s in self._sleepers if s.deadline > self._mono]
        woken = {s.task for s in due if s.task is not None}
        for s in due:
            if not s.wake.done():
                s.wake.set_result(None)
        for t in woken:
            t.add_done_callback(lambda _t: self._slept.set())
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            while not all(t.done() or any(s.task is t for s in self._sleepers) for t in woken):
                self._slept.clear()
                await self._slept.wait()
