"""The coordinator's sense of time, injectable: tests move a manual clock instead of sleeping.

Leases are instants of the monotonic clock (`monotonic`, as nanoseconds: engine.lease_now), so a
step of the wall clock loses no agent; timestamps people see (heartbeats, job times) are `time_ns`;
periodic work is paced with `monotonic` and `sleep`. A test replaces all three at once (tests/inproc/clock.py), so "the lease
ran out" is a step the test takes, not a wait.
"""

from __future__ import annotations

import asyncio
import time
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
