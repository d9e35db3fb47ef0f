"""The coordinator's sense of time, injectable: tests move a manual clock instead of sleeping.

Leases are instants of the monotonic clock (`monotonic`, as nanoseconds: engine.lease_now), so a
step of the wall clock loses no agent; timestamps people see (heartbeats, job times) are `time_ns`;
periodic work is paced with `monotonic` and `sleep`. A test replaces all three at once
(tests/inproc/clock.py), so "the lease ran out" is a step the test takes, not a wait.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Protocol


class Clock(Protocol):
    def time_ns(self) -> int:
        """Wall-clock time in nanoseconds since the epoch (what timestamps store; it may step)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back nor jumps (for intervals and leases)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Returns once `seconds` have passed on this clock."""
        ...


class SystemClock:
    def time_ns(self) -> int:
        return time.time_ns()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()


# Tests of real processes only (tests/integration/test_bounded_agent.py): the wall clock this
# coordinator sees is stepped by the seconds written in this file, so a test can step the clock
# without touching the machine's. Never set in production.
WALL_OFFSET_FILE_ENV = "DSTACK_TEST_WALL_OFFSET_FILE"
_RECHECK_S = 0.5


class OffsetWallClock(SystemClock):
    """The system clock, its wall time stepped by the number in a file (re-read at most twice a second)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset_ns = 0
        self._checked = -float("inf")

    def time_ns(self) -> int:
        now = time.monotonic()
        if now - self._checked >= _RECHECK_S:
            self._checked = now
            try:
                offset = int(float(self.path.read_text().strip() or "0") * 1e9)
            except (OSError, ValueError):
                offset = self._offset_ns
            if offset != self._offset_ns:
                logging.getLogger("dstack.coordinator").warning(
                    "test clock: the wall clock steps by %+.1f s", (offset - self._offset_ns) / 1e9
                )
                self._offset_ns = offset
        return time.time_ns() + self._offset_ns


def clock_from_env() -> Clock:
    path = os.environ.get(WALL_OFFSET_FILE_ENV)
    return OffsetWallClock(Path(path)) if path else SYSTEM_CLOCK
