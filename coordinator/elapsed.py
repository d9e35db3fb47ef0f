"""Durations on the monotonic clock for events the database stamps with wall time.

Rows keep wall-clock stamps: people read them (`dstack ps`, the API), and they are all there is
across a restart. A duration measured as `wall now - stamp` jumps with the wall clock (NTP, an
admin's `date -s`): a step of an hour ended jobs by max_duration, preempted jobs and forgot lost
agents at once. So the engine measures each such duration from the event's instant on the monotonic
clock: taken when this process saw the event (`mark`), or, for an event from before it started (or
one it did not see), derived once from the stamp at first sight and kept from then on: a step after
that first sight changes nothing. Only a step while the coordinator is down still counts, as it
must: the stamps are all that survive a restart.
"""

from __future__ import annotations

import threading
from collections.abc import Container, Hashable, Iterable

from dstack.coordinator.clock import Clock

NS = 1_000_000_000


def derived(clock: Clock, stamp_ns: int) -> float:
    """The monotonic instant of an event stamped `stamp_ns` on the wall clock, as well as the clocks
    tell now. A stamp in the future (the wall clock was set back since) reads as now."""
    ago = max(0, clock.time_ns() - stamp_ns) / NS if stamp_ns else 0.0
    return clock.monotonic() - ago


class Instants:
    """Monotonic instants (seconds) of events, by key: the event loop marks, the DB thread reads."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._at: dict[Hashable, float] = {}
        self._lock = threading.Lock()

    def mark(self, key: Hashable) -> None:
        """The event happens now (kept if it was already marked: a resent report is no new event)."""
        with self._lock:
            self._at.setdefault(key, self.clock.monotonic())

    def at(self, key: Hashable, stamp_ns: int) -> float:
        """The event's monotonic instant; `stamp_ns`: its wall-clock stamp, read only at first sight."""
        with self._lock:
            m = self._at.get(key)
            if m is None:
                m = self._at[key] = derived(self.clock, stamp_ns)
            return m

    def at_many(self, keyed: Iterable[tuple[Hashable, int]]) -> list[float]:
        """`at` of each (key, stamp), under one lock: a pass asks for every running job's."""
        out: list[float] = []
        with self._lock:
            for key, stamp_ns in keyed:
                m = self._at.get(key)
                if m is None:
                    m = self._at[key] = derived(self.clock, stamp_ns)
                out.append(m)
        return out

    def elapsed_s(self, key: Hashable, stamp_ns: int) -> float:
        return self.clock.monotonic() - self.at(key, stamp_ns)

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._at.pop(key, None)

    def keep(self, keys: Iterable[Hashable], grace_s: float = 60.0) -> None:
        """Forgets every event but these (the ones still current) and those of the last `grace_s`
        (marked before the row that names them was written: a job's start is marked as its report
        arrives, and stored a moment later)."""
        live = set(keys)
        recent = self.clock.monotonic() - grace_s
        with self._lock:
            self._at = {k: v for k, v in self._at.items() if k in live or v >= recent}


class Waits:
    """Since when (monotonic) each waiting job waits, kept in that order, so that finding the jobs that
    waited longer than a threshold costs only those jobs (event loop only)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._since: dict[str, float] = {}  # insertion order is the order of the instants

    def load(self, jobs: Iterable[tuple[str, int]]) -> None:
        """Jobs that waited before this process started: (id, submitted or requeued, as a wall stamp)."""
        for job_id, stamp in sorted(jobs, key=lambda j: j[1]):
            if job_id not in self._since:
                self._since[job_id] = derived(self.clock, stamp)
        # Keep the order: anything marked before a load (nothing, at start-up) goes after it.
        self._since = dict(sorted(self._since.items(), key=lambda kv: kv[1]))

    def start(self, job_id: str) -> None:
        """The job (a new one, or a new attempt) starts waiting now."""
        self._since.pop(job_id, None)
        self._since[job_id] = self.clock.monotonic()

    def discard(self, job_ids: Iterable[str]) -> None:
        """These jobs no longer wait (placed, stopped, failed)."""
        for job_id in job_ids:
            self._since.pop(job_id, None)

    def waited_s(self, job_id: str) -> float:
        since = self._since.get(job_id)
        return 0.0 if since is None else self.clock.monotonic() - since

    def longer_than(self, seconds: float, waiting: Container[str]) -> list[str]:
        """The jobs still `waiting` that have waited at least `seconds`, longest first; forgets, on the
        way, the jobs that no longer wait."""
        cutoff = self.clock.monotonic() - seconds
        out: list[str] = []
        gone: list[str] = []
        for job_id, since in self._since.items():
            if since > cutoff:
                break
            (out if job_id in waiting else gone).append(job_id)
        for job_id in gone:
            del self._since[job_id]
        return out
