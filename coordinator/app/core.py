"""What every use case works with: the engine, the store on its DB thread, and the object store."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

from dstack.coordinator import stored
from dstack.coordinator.app.limits import SubmissionLimits
from dstack.coordinator.app.streams import StreamLimits
from dstack.coordinator.artifacts import Artifacts
from dstack.coordinator.engine import Engine
from dstack.coordinator.model import WAITING, AttemptView, CodeRef, JobView, RunStatus, RunView
from dstack.coordinator.planner import WaitInfo
from dstack.coordinator.provided_jobs import AddedJobs, add_provided_jobs
from dstack.coordinator.store import JobRow, RunRow, Store
from dstack.coordinator.store.executor import DbExecutor
from dstack.coordinator.store.reader import ReadExecutor
from dstack.coordinator.tunnel_registry import TunnelRegistry
from dstack.storage import ArtifactStore

P = ParamSpec("P")
T = TypeVar("T")


def job_view(r: JobRow, pending_reasons: Mapping[str, str], wait_info: Mapping[str, WaitInfo] | None = None) -> JobView:
    info = wait_info.get(r.id) if wait_info is not None and r.status in WAITING else None
    return JobView(
        id=r.id,
        job_name=r.job_name,
        status=r.status,
        spec=r.spec,
        termination_reason=r.termination_reason,
        message=pending_reasons.get(r.id, "") if r.status in WAITING else r.message,
        agent_name=r.agent_name,
        gpu_indices=list(r.gpu_indices),
        exit_code=r.exit_code,
        submitted_at_ns=r.submitted_at or 0,
        started_at_ns=r.started_at or 0,
        finished_at_ns=r.finished_at or 0,
        queue_position=info.position if info else 0,
        wait_reason=info.reason if info else "",
        eta_ns=info.eta_ns if info else 0,
        attempt=r.attempt,
        ports=list(r.ports),
        attempts=[
            AttemptView(
                a.attempt,
                a.agent_name,
                a.status,
                a.termination_reason,
                a.message,
                a.started_at,
                a.finished_at,
            )
            for a in r.attempts
        ],
    )


def run_view(
    r: RunRow,
    jobs: list[JobRow],
    tags: list[str],
    pending_reasons: Mapping[str, str],
    wait_info: Mapping[str, WaitInfo] | None = None,
) -> RunView:
    """A run as clients see it: a waiting run says why, with its first waiting job's reason."""
    views = [job_view(j, pending_reasons, wait_info) for j in jobs]
    message = r.message
    if r.status in (RunStatus.SUBMITTED, RunStatus.PENDING):
        message = next((j.message for j in views if j.message), "")
    code = stored.code(r.id, r.code)
    if code is None:
        code, message = CodeRef(), stored.with_marker(message, stored.CODE_DAMAGED)
    return RunView(
        name=r.name,
        workflow=r.workflow,
        owner=r.owner,
        status=r.status,
        submitted_at_ns=r.submitted_at,
        termination_reason=r.termination_reason,
        message=message,
        finished_at_ns=r.finished_at or 0,
        code=code,
        tags=list(tags),
        jobs=views,
        repository=r.repository,
    )


def run_by_name(store: Store, name: str) -> RunRow:
    return store.run_by_name(name)


@dataclass
class Core:
    engine: Engine
    artifacts: Artifacts
    # Read-only calls' own threads and connections (coordinator/store/reader.py); None: on the DB thread.
    reads: ReadExecutor | None = None
    store: Store = field(init=False)
    db: DbExecutor = field(init=False)
    objects: ArtifactStore = field(init=False)
    limits: SubmissionLimits = field(init=False)
    streams: StreamLimits = field(init=False)  # long-lived calls open, per user and in all
    # Tunnels asked of agents, waiting for them to dial back (coordinator/services/tunnel.py holds the peers).
    tunnels: TunnelRegistry[Any] = field(init=False, default_factory=TunnelRegistry)

    def __post_init__(self) -> None:
        self.store = self.engine.store
        self.db = self.engine.db
        self.objects = self.artifacts.store
        config = self.engine.config
        self.limits = SubmissionLimits(config.max_queued_per_user, config.max_submissions_per_minute, self.engine.clock)
        self.streams = StreamLimits(config.max_streams_per_user, config.max_streams, config.stream_stall_s)
        store = self.store

        def provide(c: sqlite3.Connection, job_id: str, run_id: str, specs: Sequence[bytes]) -> AddedJobs:
            # With the run owner's authority and queued-jobs limit, as a submission (coordinator/provided_jobs.py).
            now = store.clock()
            return add_provided_jobs(c, job_id, run_id, specs, now, store.queued_jobs_of, self.limits.check_queued)

        store.jobs.provide = provide

    @property
    def local_mode(self) -> bool:
        return self.engine.config.local_mode

    def load_run(self, store: Store, name: str) -> RunView:
        """A run as clients see it (on a reader thread, or the DB thread)."""
        row, tags = store.run_with_tags(name)  # two statements in all, in the caller's one snapshot
        jobs = store.jobs_of_runs([row.id])[row.id]
        return run_view(row, jobs, tags, self.engine.pending_reasons, self.engine.wait_info)

    async def run(self, name: str) -> RunView:
        return await self.read(self.load_run, name)

    async def read(self, fn: Callable[Concatenate[Store, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(store, *args)` for a call that only reads: on a reader thread, never queued behind the
        writer's batches or a scheduling pass (coordinator/store/reader.py); without readers, on the DB
        thread with the writer's store."""
        if self.reads is not None:
            return await self.reads(fn, *args, **kwargs)
        return await self.db(functools.partial(fn, self.store, *args, **kwargs))
