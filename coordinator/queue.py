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
from collections.abc import Iterable
from dataclasses import dataclass, replace

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


class WaitingQueue:
    def __init__(self) -> None:
        self._jobs: dict[str, Waiting] = {}
        self._seq = 0
        self._by_user: dict[str, list[Waiting]] = {}  # own order once tidied; may hold jobs gone since
        self._unsorted: set[str] = set()  # users whose list took a job out of order
        self._gone: Counter[str] = Counter()  # per user: jobs gone from the queue, still in the list
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
        self._shapes[shape_of(req)] += 1
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
    ) -> None:
        """A run just stored: its jobs (id, spec), all submitted."""
        for job_id, spec in jobs:
            self._put(
                Waiting(
                    job_id=job_id,
                    run_id=run_id,
                    request=request_of(job_id, spec, owner, priority, submitted_at, workflow, run_id=run_id),
                    depends_on=spec.depends_on,
                    submitted=True,
                    cache=spec.cache and not spec.gang,
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

    def by_user(self) -> dict[str, list[Waiting]]:
        """Each user's waiting jobs in their own order (`own_key`, then arrival), as copies the caller
        may walk on another thread while the queue changes; entries for which `live` is False may remain
        (skip them). Costs the lists' tidying, amortised over the jobs that left, and a copy of each."""
        out: dict[str, list[Waiting]] = {}
        for user in list(self._by_user):
            jobs = self._by_user[user]
            gone = self._gone.get(user, 0)
            if gone * 2 >= len(jobs):
                jobs = [w for w in jobs if self.live(w)]
                gone = 0
            else:
                head = 0  # placed jobs leave from the front: drop them at once
                while head < len(jobs) and not self.live(jobs[head]):
                    head += 1
                if head:
                    del jobs[:head]
                    gone -= head
            if user in self._unsorted:
                jobs.sort(key=lambda w: (own_key(w.request), w.seq))
                self._unsorted.discard(user)
            if not jobs:
                del self._by_user[user]
                self._gone.pop(user, None)
                continue
            self._by_user[user] = jobs
            self._gone[user] = gone
            out[user] = list(jobs)
        return out

    def shapes(self) -> set[Shape]:
        """The shapes of the waiting jobs."""
        return set(self._shapes)

    def gang(self, key: str) -> list[Waiting]:
        """A gang's waiting members."""
        return list(self._gangs.get(key, {}).values())
