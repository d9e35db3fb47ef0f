"""What an agent may touch: the queries behind coordinator/app/agent_scope.py, each one indexed
statement (jobs by primary key, or by the (agent_id, status) index).

An agent acts on a job while the job is assigned to it and may still act (`ON_AGENT`: assigned,
pulling, running, uploading); once the job is finished, failed as lost or moved elsewhere, nothing
of it is the agent's any more.
"""

from __future__ import annotations

from collections.abc import Sequence

from dstack.coordinator.model import ON_AGENT, JobStatus
from dstack.coordinator.store.base import Db, ints_in, marks
from dstack.coordinator.store.jobs import JobLocation

_ACTING = f"j.agent_id = ? AND j.status IN ({ints_in(ON_AGENT)})"


class Scope:
    def __init__(self, db: Db) -> None:
        self.db = db

    def acting_job(self, agent_id: str, job_id: str) -> JobLocation | None:
        """The job, if the agent may act on it now."""
        r = self.db.row(
            "SELECT j.id, j.run_id, j.job_name, j.agent_id, j.status, r.name AS run_name FROM jobs j"
            f" JOIN runs r ON r.id = j.run_id WHERE j.id = ? AND {_ACTING}",
            [job_id, agent_id],
        )
        if r is None:
            return None
        return JobLocation(r["id"], r["run_id"], r["run_name"], r["job_name"], r["agent_id"], JobStatus(r["status"]))

    def acting_jobs(self, agent_id: str, job_ids: Sequence[str]) -> set[str]:
        """Of `job_ids`, those the agent may act on now."""
        if not job_ids:
            return set()
        ids = sorted(set(job_ids))
        rows = self.db.rows(f"SELECT j.id FROM jobs j WHERE j.id IN ({marks(ids)}) AND {_ACTING}", [*ids, agent_id])
        return {r["id"] for r in rows}

    def has_code(self, agent_id: str, code_hash: str) -> bool:
        """Whether one of the agent's acting jobs runs this code."""
        row = self.db.row(
            f"SELECT 1 FROM jobs j JOIN runs r ON r.id = j.run_id WHERE {_ACTING} AND r.code_hash = ? LIMIT 1",
            [agent_id, code_hash],
        )
        return row is not None

    def input_sources(self, agent_id: str) -> set[tuple[str, str]]:
        """(run name, job name) of every job whose artifacts one of the agent's acting jobs takes as
        inputs: the jobs it depends on in its run, and every job of the runs it takes (tags and
        workflow dependencies), as `store.artifacts.inputs_of` resolves them into the assignment."""
        rows = self.db.rows(
            "SELECT r.name AS run_name, d.value AS job_name FROM jobs j JOIN runs r ON r.id = j.run_id,"
            f" json_each(j.depends_on) d WHERE {_ACTING}"
            " UNION SELECT r.name, s.job_name FROM jobs j, json_each(j.inputs) i"
            f" JOIN runs r ON r.id = i.value JOIN jobs s ON s.run_id = r.id WHERE {_ACTING}",
            [agent_id, agent_id],
        )
        return {(r["run_name"], r["job_name"]) for r in rows}
