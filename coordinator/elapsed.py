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
from collections.abc import Container, Iterable, Mapping

from dstack.coordinator.clock import Clock

NS = 1_000_000_000


def derived(clock: Clock, stamp_ns: int) -> float:
    """The monotonic instant of an event stamped `stamp_ns` on the wall clock, as well as the clocks
    tell now. A stamp in the future (the wall clock was set back since) reads as now."""
    ago = max(0, clock.time_ns() - stamp_ns) / NS if stamp_ns else 0.0
    return clock.monotonic() - ago


class Instants:
    """Monotonic instants (seconds) of events, by key (a job's or an agent's id): the event loop marks,
    the DB thread reads. A key has one event at a time, told apart from the key's earlier ones by its
    `event` number (a job's start stamp: each attempt starts anew); an event of a key replaces the one
    kept for it.

    Kept as two dicts of strings, floats and ints, never tuples (issue 16): the DB thread asks for every
    running job's start each pass (5,000 at full size), and a dict keyed by (job, stamp) tuples was tracked
    by the collector, so every full collection followed all its keys (~8% of the references one walked).
    A dict of atoms is never tracked."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._at: dict[str, float] = {}
        self._event: dict[str, int] = {}  # the event each instant in `_at` is of
        self._lock = threading.Lock()

    def mark(self, key: str, event: int = 0) -> None:
        """The event happens now (kept if it was already marked: a resent report is no new event)."""
        with self._lock:
            if key not in self._at or self._event[key] != event:
                self._at[key] = self.clock.monotonic()
                self._event[key] = event

    def at(self, key: str, stamp_ns: int, event: int = 0) -> float:
        """The event's monotonic instant; `stamp_ns`: its wall-clock stamp, read only at first sight."""
        with self._lock:
            return self._at_locked(key, event, stamp_ns)

    def _at_locked(self, key: str, event: int, stamp_ns: int) -> float:
        m = self._at.get(key)
        if m is None or self._event[key] != event:
            m = self._at[key] = derived(self.clock, stamp_ns)
            self._event[key] = event
        return m

    def at_many(self, keyed: Iterable[tuple[str, int, int]]) -> list[float]:
        """`at` of each (key, event, stamp), under one lock: a pass asks for every running job's."""
        out: list[float] = []
        with self._lock:
            at, events = self._at, self._event
            for key, event, stamp_ns in keyed:
                m = at.get(key)
                if m is None or events[key] != event:
                    m = self._at_locked(key, event, stamp_ns)
                out.append(m)
        return out

    def elapsed_s(self, key: str, stamp_ns: int, event: int = 0) -> float:
        return self.clock.monotonic() - self.at(key, stamp_ns, event)

    def forget(self, key: str) -> None:
        with self._lock:
            self._at.pop(key, None)
            self._event.pop(key, None)

    def keep(self, live: Iterable[tuple[str, int]], grace_s: float = 60.0) -> None:
        """Forgets every event but these (key, event) pairs (the ones still current) and those of the
        last `grace_s` (marked before the row that names them was written: a job's start is marked as its
        report arrives, and stored a moment later)."""
        current = dict(live)
        recent = self.clock.monotonic() - grace_s
        with self._lock:
            events = self._event
            kept = {k for k, v in self._at.items() if v >= recent or current.get(k, -1) == events[k]}
            self._at = {k: v for k, v in self._at.items() if k in kept}
            self._event = {k: v for k, v in events.items() if k in kept}


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

    def instants(self) -> Mapping[str, float]:
        """Since when each job waits (monotonic; to read, not to change: the preemption check reads it on
        the DB thread, one look-up a job, as it reads `waited_s`)."""
        return self._since

    def waited_s(self, job_id: str) -> float:
        since = self._since.get(job_id)
        return 0.0 if since is None else self.clock.monotonic() - since

    def tidy(self, waiting: Container[str], size: int) -> None:
        """Forgets the jobs that no longer wait once they are as many as those that do (`size`: how many
        wait): `longer_than` forgets them on its way, but it is not called while no job may be preempted
        (Engine._preempt_by_policy), and a job stopped or failed while waiting is not `discard`ed. A walk of
        every entry, once per `size` jobs gone: a constant cost per job."""
        if len(self._since) > 2 * size + 1000:
            self._since = {j: t for j, t in self._since.items() if j in waiting}

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
