"""What /metrics reports about the state now: counts by status from two grouped queries on the DB
thread, the queue and the agents from memory and one agents read (coordinator/http/metrics.py)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from dstack.coordinator.app import agents
from dstack.coordinator.app.core import Core
from dstack.coordinator.model import AgentView, JobStatus, RunStatus


@dataclass(frozen=True)
class StateCounts:
    runs: dict[RunStatus, int]
    jobs: dict[JobStatus, int]
    queued_per_user: dict[str, int]
    agents: list[AgentView]
    store_errors: int  # database calls that failed with a database error since start


async def state_counts(core: Core) -> StateCounts:
    def counts() -> tuple[dict[RunStatus, int], dict[JobStatus, int]]:
        return core.store.run_counts(), core.store.job_counts()

    runs, jobs = await core.db(counts)
    queued = Counter(w.request.owner for w in core.engine.queue.snapshot())
    return StateCounts(runs, jobs, dict(queued), await agents.list_agents(core), core.db.sqlite_errors)
