"""Exponential backoff with jitter and a deadline: the timing half of every retry loop.

Which failures are retried is not decided here (agent/retry.py holds the agent's table; the transfer
engine retries StoreUnavailable by default); this only says how long to wait before the next attempt,
and when to stop.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    deadline_s: float = 60.0  # retrying stops this long after the first failure
    first_s: float = 0.2
    max_s: float = 5.0

    def start(self) -> Attempts:
        return Attempts(self)


class Attempts:
    """One call's retries: ask `next_delay()` after each failure."""

    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff
        self.first_failure: float | None = None
        self.failures = 0
        self._delay = backoff.first_s

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt, or None when the deadline has passed."""
        now = time.monotonic()
        if self.first_failure is None:
            self.first_failure = now
        self.failures += 1
        left = self.first_failure + self.backoff.deadline_s - now
        if left <= 0:
            return None
        # Jitter: agents that lost the same store at the same moment do not come back in lockstep.
        delay = min(self._delay * (0.5 + random.random()), left)
        self._delay = min(self._delay * 2, self.backoff.max_s)
        return delay

    def elapsed(self) -> float:
        return 0.0 if self.first_failure is None else time.monotonic() - self.first_failure
