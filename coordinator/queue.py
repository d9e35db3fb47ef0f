"""The waiting jobs, in memory and in submission order, so a scheduling pass costs no database scan.

The database stays the truth: the queue is rebuilt from it at start-up, and every decision taken
from it is applied with a status check in SQL (a job stopped meanwhile is not placed).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dstack.coordinator.convert import job_spec_from_bytes
from dstack.coordinator.durations import duration_key, max_duration_s
from dstack.coordinator.model import JobSpec, JobStatus
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

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def add_row(self, row: WaitingJob) -> None:
        """From store.waiting_jobs() at start-up."""
        spec = job_spec_from_bytes(row.spec)
        self._jobs[row.id] = Waiting(
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
            self._jobs[job_id] = Waiting(
                job_id=job_id,
                run_id=run_id,
                request=request_of(job_id, spec, owner, priority, submitted_at, workflow, run_id=run_id),
                depends_on=spec.depends_on,
                submitted=True,
                cache=spec.cache and not spec.gang,
            )

    def add_waiting(self, w: Waiting) -> None:
        """A job taken out for the step cache that has to run after all."""
        self._jobs[w.job_id] = w

    def snapshot(self) -> list[Waiting]:
        return list(self._jobs.values())

    def discard(self, job_ids: list[str]) -> None:
        for j in job_ids:
            self._jobs.pop(j, None)

    def discard_run(self, run_id: str) -> None:
        for j in [w.job_id for w in self._jobs.values() if w.run_id == run_id]:
            del self._jobs[j]

    def mark_pending(self, job_ids: list[str]) -> None:
        for j in job_ids:
            w = self._jobs.get(j)
            if w is not None:
                w.submitted = False
