"""Per-user limits at submission: how many jobs a user may have waiting, and how fast they may submit.

One user must not be able to flood the queue (and the scheduler's every pass) for everyone else.
Both limits answer RESOURCE_EXHAUSTED with a message that names the limit, its option and the numbers.

- queued jobs: counted from the database at each submission, on the DB thread in the same step that
  stores the run, so that concurrent submissions cannot both slip under the limit;
- submission rate: a token bucket per user, in memory (a restart refills it, which is harmless), paced
  by the coordinator's clock so tests drive it with a manual one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dstack.coordinator.clock import Clock
from dstack.coordinator.errors import LimitExceeded

DEFAULT_MAX_QUEUED_PER_USER = 1000
DEFAULT_MAX_SUBMISSIONS_PER_MINUTE = 600


@dataclass
class _Bucket:
    tokens: float
    at: float  # monotonic seconds of the last refill


@dataclass
class SubmissionLimits:
    max_queued_per_user: int  # 0: no limit
    max_submissions_per_minute: int  # 0: no limit
    clock: Clock
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def take_submission(self, user: str) -> None:
        """Counts one submission of `user` against the rate limit; raises LimitExceeded when over it.

        A full bucket holds a minute's worth, so a burst of that size passes and then the rate holds.
        """
        per_minute = self.max_submissions_per_minute
        if per_minute <= 0:
            return
        now = self.clock.monotonic()
        bucket = self._buckets.get(user)
        if bucket is None:
            bucket = self._buckets[user] = _Bucket(float(per_minute), now)
        rate = per_minute / 60.0  # tokens per second
        bucket.tokens = min(float(per_minute), bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.tokens < 1.0:
            wait_s = math.ceil((1.0 - bucket.tokens) / rate)
            raise LimitExceeded(
                f"you submit runs faster than the limit of {per_minute} per minute, in bursts of up to"
                f" {per_minute} (--max-submissions-per-minute): try again in {wait_s} s"
            )
        bucket.tokens -= 1.0

    def check_queued(self, user: str, queued: int, adding: int) -> None:
        """Raises LimitExceeded when `adding` more waiting jobs would take `user` over the limit."""
        limit = self.max_queued_per_user
        if limit <= 0 or queued + adding <= limit:
            return
        adds = f" and this run adds {adding}" if queued < limit else ""
        raise LimitExceeded(
            f"you have {queued} queued job(s){adds}, the limit is {limit} (--max-queued-per-user):"
            " wait for some to start or stop some"
        )
