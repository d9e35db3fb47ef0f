"""How long a job is expected to run: the median of its workflow's recent durations (in memory, seeded
from the database at start-up), for queue estimates and for choosing which agent to reserve."""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable

from dstack.coordinator.model import JobSpec

RECENT = 25  # durations kept per workflow job


def duration_key(workflow: str, job_name: str) -> str:
    return f"{workflow}/{job_name}"


def max_duration_s(spec: JobSpec) -> float | None:
    """The job's own time limit (`max_duration:`), when the spec carries one (read if present: the field
    comes with the retries item of the issue)."""
    value = getattr(spec, "max_duration_s", None)
    return float(value) if value else None


class Durations:
    def __init__(self) -> None:
        self._recent: dict[str, deque[float]] = {}
        self.medians: dict[str, float] = {}

    def add(self, finished: Iterable[tuple[str, float]]) -> None:
        """(key, seconds) of jobs that finished done, oldest first."""
        changed = set()
        for key, seconds in finished:
            self._recent.setdefault(key, deque(maxlen=RECENT)).append(seconds)
            changed.add(key)
        for key in changed:
            self.medians[key] = statistics.median(self._recent[key])
