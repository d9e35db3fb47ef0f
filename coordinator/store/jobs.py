"""Jobs: reads, scheduling passes, agents' reports, and what an agent's reconnect settles.

Every status change goes through coordinator/lifecycle (the transition table)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from dstack.coordinator import lifecycle
from dstack.coordinator.errors import NotFound
from dstack.coordinator.model import (
    ON_AGENT,
    TERMINAL_JOB,
    WAITING,
    ArtifactInput,
    JobStatus,
    JobUpdate,
    TerminationReason,
    UpdateAck,
    termination_reason,
)
from dstack.coordinator.store.artifacts import inputs_of
from dstack.coordinator.store.base import Db, ints_in, json_list, marks


@dataclass(frozen=True)
class JobRow:
    id: str
    run_id: str
    job_name: str
    spec: bytes  # a serialized dstack.v1.JobSpec, kept opaque
    status: JobStatus
    termination_reason: TerminationReason
    message: str
    agent_id: str | None
    agent_name: str  # "" while not placed
    gpu_indices: list[int]
    exit_code: int | None
    submitted_at: int
    started_at: int | None
    finished_at: int | None
    stop_requested: bool
    cpu: float
    memory: int
    gpu_count: int
    depends_on: list[str]  # job names in the same run
    inputs: list[str]  # ids of runs whose artifacts it takes
    logs_state: int  # 0: logs in the database, 1: archived to the store, 2: deleted by retention

    @classmethod
    def of(cls, r: sqlite3.Row) -> JobRow:
        return cls(
            id=r["id"],
            run_id=r["run_id"],
            job_name=r["job_name"],
            spec=r["spec"],
            status=JobStatus(r["status"]),
            termination_reason=termination_reason(r["termination_reason"]),
            message=r["message"] or "",
            agent_id=r["agent_id"],
            agent_name=r["agent_name"] or "",
            gpu_indices=json_list(r["gpu_indices"]),
            exit_code=r["exit_code"],
            submitted_at=r["submitted_at"],
            started_at=r["started_at"],
            finished_at=r["finished_at"],
            stop_requested=bool(r["stop_requested"]),
            cpu=r["cpu"] or 0.0,
            memory=r["memory"] or 0,
            gpu_count=r["gpu_count"] or 0,
            depends_on=json_list(r["depends_on"]),
            inputs=json_list(r["inputs"]),
            logs_state=r["logs_state"] or 0,
        )


@dataclass(frozen=True)
class WaitingJob:
    id: str
    run_id: str
    status: JobStatus
    spec: bytes
    depends_on: list[str]
    owner: str
    priority: int


@dataclass(frozen=True)
class Allocation:
    """What a job on an agent holds."""

    agent_id: str
    cpu: float
    memory: int
    gpu_indices: list[int]


@dataclass(frozen=True)
class AgentJob:
    id: str
    status: JobStatus
    stop_requested: bool


@dataclass(frozen=True)
class JobLocation:
    id: str
    run_id: str
    run_name: str
    job_name: str
    agent_id: str | None
    status: JobStatus


@dataclass(frozen=True)
class Placement:
    job_id: str
    agent_id: str
    gpu_indices: list[int]


@dataclass(frozen=True)
class Assignment:
    """A placed job, with what the agent needs to run it."""

    job_id: str
    agent_id: str
    run_name: str
    spec: bytes
    code: bytes
    gpu_indices: list[int]
    inputs: list[ArtifactInput] = field(default_factory=list)
    owner: str = ""  # the run's owner: the job gets the team's secrets and this user's own


@dataclass
class UpdateResult:
    acks: list[UpdateAck] = field(default_factory=list)
    changed_runs: set[str] = field(default_factory=set)  # run ids whose status may have changed
    freed: bool = False  # capacity was released: the scheduler should look again


def fail_agent_jobs(
    c: sqlite3.Connection,
    agent_id: str,
    t: lifecycle.JobTransition,
    message: str,
    now: int,
    job_ids: Sequence[str] | None = None,
) -> None:
    """Fails the agent's jobs (those of `job_ids` only, if given), their dependants, and updates their runs."""
    where, params = "agent_id = :agent", {"agent": agent_id}
    if job_ids is not None:
        names = [f"j{i}" for i in range(len(job_ids))]
        where += f" AND id IN ({', '.join(':' + n for n in names)})"
        params.update(zip(names, job_ids, strict=True))
    for run_id in {m.run_id for m in lifecycle.move_jobs(c, t, where, params, message=message, at=now)}:
        lifecycle.fail_dependants(c, run_id, now)
        lifecycle.refresh_run_status(c, run_id, now)


class Jobs:
    def __init__(self, db: Db) -> None:
        self.db = db

    def of_runs(self, run_ids: Sequence[str]) -> dict[str, list[JobRow]]:
        out: dict[str, list[JobRow]] = {r: [] for r in run_ids}
        if not run_ids:
            return out
        rows = self.db.rows(
            "SELECT j.*, a.name AS agent_name FROM jobs j LEFT JOIN agents a ON a.id = j.agent_id"
            f" WHERE j.run_id IN ({marks(run_ids)}) ORDER BY j.submitted_at, j.rowid",
            list(run_ids),
        )
        for r in rows:
            out[r["run_id"]].append(JobRow.of(r))
        return out

    def run_ids(self, job_ids: Sequence[str]) -> dict[str, str]:
        rows = self.db.rows(f"SELECT id, run_id FROM jobs WHERE id IN ({marks(job_ids)})", list(job_ids))
        return {r["id"]: r["run_id"] for r in rows}

    def location(self, job_id: str) -> JobLocation:
        r = self.db.row(
            "SELECT j.id, j.run_id, j.job_name, j.agent_id, j.status, r.name AS run_name FROM jobs j"
            " JOIN runs r ON r.id = j.run_id WHERE j.id = ?",
            [job_id],
        )
        if r is None:
            raise NotFound(f"job {job_id!r} does not exist")
        return JobLocation(r["id"], r["run_id"], r["run_name"], r["job_name"], r["agent_id"], JobStatus(r["status"]))

    # ---- scheduling --------------------------------------------------------------------------
    def waiting(self) -> list[WaitingJob]:
        rows = self.db.rows(
            "SELECT j.id, j.run_id, j.status, j.spec, j.depends_on, r.owner, r.priority"
            " FROM jobs j JOIN runs r ON r.id = j.run_id"
            f" WHERE j.status IN ({ints_in(WAITING)}) ORDER BY r.priority DESC, j.submitted_at, j.rowid"
        )
        return [
            WaitingJob(
                r["id"],
                r["run_id"],
                JobStatus(r["status"]),
                r["spec"],
                json_list(r["depends_on"]),
                r["owner"],
                r["priority"] or 0,
            )
            for r in rows
        ]

    def dependency_statuses(self, run_ids: Sequence[str]) -> dict[tuple[str, str], JobStatus]:
        """(run_id, job_name) -> status, and (run_id, "#" + job_id) -> status, for the jobs of runs."""
        if not run_ids:
            return {}
        out: dict[tuple[str, str], JobStatus] = {}
        sql = f"SELECT id, run_id, job_name, status FROM jobs WHERE run_id IN ({marks(run_ids)})"
        for r in self.db.rows(sql, list(run_ids)):
            out[(r["run_id"], r["job_name"])] = out[(r["run_id"], "#" + r["id"])] = JobStatus(r["status"])
        return out

    def active_allocations(self) -> list[Allocation]:
        rows = self.db.rows(
            f"SELECT agent_id, cpu, memory, gpu_indices FROM jobs WHERE status IN ({ints_in(ON_AGENT)})"
        )
        return [Allocation(r["agent_id"], r["cpu"] or 0.0, r["memory"] or 0, json_list(r["gpu_indices"])) for r in rows]

    def apply_schedule(
        self,
        placements: Sequence[Placement],
        waiting: Collection[str],
        failures: Sequence[tuple[str, str]],
    ) -> list[Assignment]:
        """Records a scheduler pass: placed jobs become ASSIGNED, waiting ones PENDING, impossible ones
        (job id, why) FAILED. Why a job waits changes with every pass, so it is kept in memory, not
        written here."""
        if not placements and not waiting and not failures:
            return []
        now = self.db.clock()
        touched: set[str] = set()
        out: list[Assignment] = []
        with self.db.tx() as c:
            for p in placements:
                moved = lifecycle.move_job(
                    c,
                    lifecycle.PLACE,
                    p.job_id,
                    also="agent_id = :agent, gpu_indices = :gpus, message = ''",
                    params={"agent": p.agent_id, "gpus": json.dumps(p.gpu_indices)},
                )
                if moved is None:
                    continue  # stopped meanwhile
                touched.add(moved.run_id)
                spec = c.execute("SELECT spec FROM jobs WHERE id = ?", [p.job_id]).fetchone()[0]
                name, code, owner = c.execute(
                    "SELECT name, code, owner FROM runs WHERE id = ?", [moved.run_id]
                ).fetchone()
                inputs = inputs_of(c, p.job_id)
                out.append(Assignment(p.job_id, p.agent_id, name, spec, code, p.gpu_indices, inputs, owner))
            for job_id in waiting:
                moved = lifecycle.move_job(c, lifecycle.MARK_PENDING, job_id)
                if moved is not None:
                    touched.add(moved.run_id)
            for job_id, why in failures:
                moved = lifecycle.move_job(c, lifecycle.UNSCHEDULABLE, job_id, message=why, at=now)
                if moved is not None:
                    touched.add(moved.run_id)
                    lifecycle.fail_dependants(c, moved.run_id, now)
            for run_id in touched:
                lifecycle.refresh_run_status(c, run_id, now)
        return out

    def assignments_for_agent(self, agent_id: str, job_ids: Sequence[str]) -> list[Assignment]:
        if not job_ids:
            return []
        rows = self.db.rows(
            "SELECT j.id, j.spec, j.gpu_indices, r.name, r.code, r.owner FROM jobs j JOIN runs r ON r.id = j.run_id"
            f" WHERE j.id IN ({marks(job_ids)}) AND j.agent_id = ?",
            [*job_ids, agent_id],
        )
        return [
            Assignment(
                r["id"],
                agent_id,
                r["name"],
                r["spec"],
                r["code"],
                json_list(r["gpu_indices"]),
                inputs_of(self.db.conn, r["id"]),
                r["owner"],
            )
            for r in rows
        ]

    # ---- an agent's jobs ---------------------------------------------------------------------
    def on_agent(self, agent_id: str) -> list[AgentJob]:
        rows = self.db.rows(
            f"SELECT id, status, stop_requested FROM jobs WHERE agent_id = ? AND status IN ({ints_in(ON_AGENT)})",
            [agent_id],
        )
        return [AgentJob(r["id"], JobStatus(r["status"]), bool(r["stop_requested"])) for r in rows]

    def terminal_or_unknown(self, agent_id: str, job_ids: Sequence[str]) -> list[str]:
        """Of the jobs an agent says it runs, those it should not be running any more."""
        if not job_ids:
            return []
        live = {
            r["id"]
            for r in self.db.rows(
                f"SELECT id FROM jobs WHERE id IN ({marks(job_ids)}) AND agent_id = ?"
                f" AND status IN ({ints_in(ON_AGENT)})",
                [*job_ids, agent_id],
            )
        }
        return [j for j in job_ids if j not in live]

    def stop_unstarted(self, job_ids: Sequence[str]) -> None:
        """Jobs stopped while their agent was away, which came back without having started them."""
        if not job_ids:
            return
        with self.db.tx() as c:
            now = self.db.clock()
            runs = set()
            for job_id in job_ids:
                moved = lifecycle.move_job(c, lifecycle.STOP_UNSTARTED, job_id, message="stopped by user", at=now)
                if moved is not None:
                    runs.add(moved.run_id)
            for run_id in runs:
                lifecycle.fail_dependants(c, run_id, now)
                lifecycle.refresh_run_status(c, run_id, now)

    def fail_lost_by_agent(self, agent_id: str, job_ids: Sequence[str]) -> None:
        if job_ids:
            with self.db.tx() as c:
                message = "the agent restarted and no longer has this job"
                fail_agent_jobs(c, agent_id, lifecycle.LOST_BY_AGENT, message, self.db.clock(), job_ids)

    def apply_updates(self, agent_id: str, updates: Sequence[JobUpdate]) -> UpdateResult:
        """An agent's reports, each acknowledged; stale or repeated ones change nothing."""
        res = UpdateResult()
        with self.db.tx() as c:
            for u in updates:
                res.acks.append(UpdateAck(u.job_id, u.status))
                row = c.execute(
                    "SELECT status, run_id, stop_requested FROM jobs WHERE id = ? AND agent_id = ?",
                    [u.job_id, agent_id],
                ).fetchone()
                if row is None:
                    continue  # not this agent's job (any more)
                status, run_id, stop_requested = row
                t = lifecycle.agent_transition(u.status, bool(stop_requested))
                if t is None or status not in t.src:
                    lifecycle.refuse_job(u.job_id, status, u.status, "agent report")
                    continue
                if self._apply(c, t, u) and t.dst in TERMINAL_JOB:
                    res.freed = True
                    if t.dst != JobStatus.DONE:
                        lifecycle.fail_dependants(c, run_id, self.db.clock())
                res.changed_runs.add(run_id)
            for run_id in res.changed_runs:  # once per run, however many of its jobs changed
                lifecycle.refresh_run_status(c, run_id, self.db.clock())
        return res

    def _apply(self, c: sqlite3.Connection, t: lifecycle.JobTransition, u: JobUpdate) -> bool:
        at = u.time_ns or self.db.clock()
        params = {"t": at, "e": u.exit_code}
        if t.dst == JobStatus.PULLING:
            also = ""
        elif t.dst == JobStatus.RUNNING:
            also = "started_at = :t"
        elif t.dst == JobStatus.UPLOADING:
            also = "exit_code = :e, started_at = COALESCE(started_at, :t)"
        else:
            also = "exit_code = COALESCE(:e, exit_code)"
        # A job the user asked to stop ends stopped, however its agent saw the end.
        message = "stopped by user" if t is lifecycle.AGENT_STOPPED_ON_REQUEST else u.message
        moved = lifecycle.move_job(
            c, t, u.job_id, reason=u.termination_reason, message=message, at=at, also=also, params=params
        )
        return moved is not None
