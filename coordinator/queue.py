"""The waiting jobs, in memory and in submission order, so a scheduling pass costs no database scan.

The database stays the truth: the queue is rebuilt from it at start-up, and every decision taken
from it is applied with a status check in SQL (a job stopped meanwhile is not placed).

Besides the jobs by id, the queue keeps what a heads-only pass (coordinator/planner.py `place_heads`)
walks, updated as jobs come and go rather than worked out per pass: each user's jobs in the user's own
order (`own_key`, then arrival), the shapes that wait, and each gang's waiting members. A job that
leaves stays in its user's list until the list is tidied (its head at every heads pass, the whole list
as soon as half of it is gone), and is skipped meanwhile: the lists hold at most twice the waiting jobs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from typing import overload

from dstack.coordinator.convert import job_spec_from_bytes
from dstack.coordinator.durations import duration_key, max_duration_s
from dstack.coordinator.model import JobSpec, JobStatus
from dstack.coordinator.planner import Shape, own_key, shape_of
from dstack.coordinator.scheduler import JobRequest
from dstack.coordinator.store import WaitingJob


@dataclass
class Waiting:
    job_id: str
    run_id: str
    request: JobRequest
    depends_on: tuple[str, ...]
    submitted: bool  # still SUBMITTED in the database (not yet marked PENDING)
    # The step cache is to be asked about it once it may start (coordinator/cache.py); cleared once asked.
    cache: bool = False
    seq: int = 0  # arrival order in the queue (set by WaitingQueue): ties in the order go to the earlier
    # Read from its spec once, on the way in: preemption's check leaves these out without a read (engine.py).
    interruptible: bool = False
    # Its row's `submitted_at` (a provider-added job's is when it was added, its request's is its run's):
    # the order the preemption policy walks the long waits in (`store.starved_among`).
    stored_at: int = 0
    # (owner, shape) as the preemption policy groups the jobs it may serve; None for those it never
    # serves (interruptible jobs, gangs' members). Set by WaitingQueue.
    kind: tuple[str, Shape] | None = None


def request_of(
    job_id: str,
    spec: JobSpec,
    owner: str = "",
    priority: int = 0,
    submitted_at: int = 0,
    workflow: str = "",
    avoid_agent: str = "",
    run_id: str = "",
) -> JobRequest:
    """`run_id`: the job's run, which keys a gang's members (a gang's name is unique only in its run)."""
    resources = spec.resources
    return JobRequest(
        job_id=job_id,
        cpu=resources.cpu,
        memory=resources.memory_bytes,
        gpu_count=resources.gpu_count,
        gpu_name=resources.gpu_name,
        gpu_memory=resources.gpu_memory_bytes,
        needs_container=spec.needs_container,
        owner=owner,
        priority=priority,
        submitted_at=submitted_at,
        duration_key=duration_key(workflow or spec.workflow, spec.job_name),
        max_duration_s=max_duration_s(spec),
        avoid_agent=avoid_agent,
        gang=f"{run_id}/{spec.gang}" if spec.gang else "",
        nnodes=spec.nnodes,
        node_rank=spec.node_rank,
    )


class Window(Sequence[Waiting]):
    """Entries `start` to `end` of a user's list, as `by_user` hands them to a pass, without a copy.

    Why not a copy (issue 16): a heads-only pass copied each user's whole list (one reference per waiting
    job) and the copy lived through the pass on the DB thread, long enough for CPython's full
    collections to walk it (bench/memprobe.py's census at a quarter of full size: 25,000 references in
    most of them), and the copy itself touched every entry. Safe to read on another thread because the
    queue never changes a list it may have handed out other than by appending past `end`: its head is
    skipped by an offset, and a sort or a tidy builds a new list."""

    __slots__ = ("_items", "_len", "_start")

    def __init__(self, items: list[Waiting], start: int, end: int) -> None:
        self._items, self._start, self._len = items, start, end - start

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, i: int) -> Waiting: ...

    @overload
    def __getitem__(self, i: slice) -> list[Waiting]: ...

    def __getitem__(self, i: int | slice) -> Waiting | list[Waiting]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self._len))]
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(i)
        return self._items[self._start + i]

    def __iter__(self) -> Iterator[Waiting]:
        return islice(self._items, self._start, self._start + self._len)


class WaitingQueue:
    def __init__(self) -> None:
        self._jobs: dict[str, Waiting] = {}
        self._seq = 0
        self._by_user: dict[str, list[Waiting]] = {}  # own order once tidied; may hold jobs gone since
        self._unsorted: set[str] = set()  # users whose list took a job out of order
        self._gone: Counter[str] = Counter()  # per user: jobs gone from the queue, still in the list
        self._start: dict[str, int] = {}  # per user: the entries before it are gone (skipped, not deleted)
        self._shapes: Counter[Shape] = Counter()
        self._gangs: dict[str, dict[str, Waiting]] = {}  # gang key -> job -> waiting member

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def get(self, job_id: str) -> Waiting | None:
        return self._jobs.get(job_id)

    def _put(self, w: Waiting) -> None:
        old = self._jobs.pop(w.job_id, None)  # out first: `_forget` may tidy, and must see it gone
        if old is not None:
            self._forget(old)
        self._seq += 1
        w.seq = self._seq
        self._jobs[w.job_id] = w
        req = w.request
        jobs = self._by_user.setdefault(req.owner, [])
        if jobs and (own_key(jobs[-1].request), jobs[-1].seq) > (own_key(req), w.seq):
            self._unsorted.add(req.owner)
        jobs.append(w)
        shape = shape_of(req)
        w.kind = None if w.interruptible or req.gang else (req.owner, shape)
        self._shapes[shape] += 1
        if req.gang:
            self._gangs.setdefault(req.gang, {})[w.job_id] = w

    def _forget(self, w: Waiting) -> None:
        """`w` left the queue (already out of `_jobs`): out of the counts now, out of its user's list
        once half of that list is gone. Tidied here and not only in `by_user`: over a shallow queue the
        full pass never calls `by_user`, and every job ever queued stayed in its user's list (the soak's
        RSS grew by ~5.5 MiB an hour at 2 runs/s)."""
        req = w.request
        gone = self._gone[req.owner] + 1
        jobs = self._by_user.get(req.owner, [])
        if gone * 2 >= len(jobs):  # amortised: each tidying drops at least as many entries as it keeps
            kept = [x for x in jobs if self.live(x)]
            self._start.pop(req.owner, None)
            if kept:
                self._by_user[req.owner] = kept
                self._gone[req.owner] = 0
            else:
                self._by_user.pop(req.owner, None)
                self._gone.pop(req.owner, None)
        else:
            self._gone[req.owner] = gone
        shape = shape_of(req)
        self._shapes[shape] -= 1
        if not self._shapes[shape]:
            del self._shapes[shape]
        if req.gang:
            members = self._gangs.get(req.gang)
            if members is not None:
                members.pop(w.job_id, None)
                if not members:
                    del self._gangs[req.gang]

    def add_row(self, row: WaitingJob) -> None:
        """From store.waiting_jobs() at start-up."""
        spec = job_spec_from_bytes(row.spec)
        self._put(
            Waiting(
                job_id=row.id,
                run_id=row.run_id,
                request=request_of(
                    row.id,
                    spec,
                    row.owner,
                    row.priority,
                    row.submitted_at,
                    row.workflow,
                    avoid_agent=row.avoid_agent,
                    run_id=row.run_id,
                ),
                depends_on=tuple(row.depends_on),
                submitted=row.status == JobStatus.SUBMITTED,
                cache=spec.cache and not spec.gang,
                interruptible=spec.interruptible,
                stored_at=row.submitted_at,
            )
        )

    def add_run(
        self,
        run_id: str,
        jobs: Iterable[tuple[str, JobSpec]],
        owner: str = "",
        priority: int = 0,
        submitted_at: int = 0,
        workflow: str = "",
        stored_at: int | None = None,
    ) -> None:
        """A run just stored: its jobs (id, spec), all submitted (`stored_at`: their rows' `submitted_at`
        when not the run's, as for jobs a provider program added)."""
        for job_id, spec in jobs:
            self._put(
                Waiting(
                    job_id=job_id,
                    run_id=run_id,
                    request=request_of(job_id, spec, owner, priority, submitted_at, workflow, run_id=run_id),
                    depends_on=spec.depends_on,
                    submitted=True,
                    cache=spec.cache and not spec.gang,
                    interruptible=spec.interruptible,
                    stored_at=submitted_at if stored_at is None else stored_at,
                )
            )

    def add_waiting(self, w: Waiting) -> None:
        """A job taken out for the step cache that has to run after all."""
        self._put(replace(w))  # a fresh entry: the old one may still sit in its user's list, gone

    def snapshot(self) -> list[Waiting]:
        return list(self._jobs.values())

    def discard(self, job_ids: Iterable[str]) -> None:
        for j in job_ids:
            w = self._jobs.pop(j, None)
            if w is not None:
                self._forget(w)

    def discard_run(self, run_id: str) -> None:
        self.discard([w.job_id for w in self._jobs.values() if w.run_id == run_id])

    def mark_pending(self, job_ids: list[str]) -> None:
        for j in job_ids:
            w = self._jobs.get(j)
            if w is not None:
                w.submitted = False

    # ---- what a heads-only pass walks ----------------------------------------------------------
    def live(self, w: Waiting) -> bool:
        """Whether this entry of a user's list still waits (not gone, nor replaced by a later entry)."""
        return self._jobs.get(w.job_id) is w

    def by_user(self) -> dict[str, Sequence[Waiting]]:
        """Each user's waiting jobs in their own order (`own_key`, then arrival), as windows (`Window`)
        the caller may walk on another thread while the queue changes; entries for which `live` is False
        may remain (skip them). Costs the lists' tidying, amortised over the jobs that left."""
        out: dict[str, Sequence[Waiting]] = {}
        for user in list(self._by_user):
            jobs = self._by_user[user]
            gone = self._gone.get(user, 0)
            start = self._start.get(user, 0)
            if gone * 2 >= len(jobs):
                jobs = [w for w in jobs if self.live(w)]
                gone = start = 0
            else:
                # Placed jobs leave from the front: skipped at once by moving the offset (still counted
                # as gone: they are still in the list), not deleted, since an earlier pass may read it.
                while start < len(jobs) and not self.live(jobs[start]):
                    start += 1
            if user in self._unsorted:
                jobs = sorted(jobs[start:], key=lambda w: (own_key(w.request), w.seq))  # a new list
                gone, start = gone - start, 0
                self._unsorted.discard(user)
            if start >= len(jobs):
                del self._by_user[user]
                self._gone.pop(user, None)
                self._start.pop(user, None)
                continue
            self._by_user[user] = jobs
            self._gone[user] = gone
            self._start[user] = start
            out[user] = Window(jobs, start, len(jobs))
        return out

    def shapes(self) -> set[Shape]:
        """The shapes of the waiting jobs."""
        return set(self._shapes)

    def gang(self, key: str) -> list[Waiting]:
        """A gang's waiting members."""
        return list(self._gangs.get(key, {}).values())
