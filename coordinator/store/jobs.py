"""Jobs: reads, scheduling passes, agents' reports, and what an agent's reconnect settles.

Every status change goes through coordinator/lifecycle (the transition table)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dstack.coordinator import lifecycle
from dstack.coordinator.attempts import parse_wire_job_id, wire_job_id
from dstack.coordinator.errors import CoordinatorError, NotFound
from dstack.coordinator.lifecycle import attempts
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
from dstack.coordinator.preemption import RunningJob
from dstack.coordinator.store.artifacts import inputs_of
from dstack.coordinator.store.base import Db, ints_in, json_list, marks, stored_reason
from dstack.coordinator.store.cache import key_of_row, key_without_inputs
from dstack.coordinator.store.gangs import GangSettlement, settle
from dstack.protos.v1 import common_pb2


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
    attempt: int = 1  # the current attempt's number (coordinator/attempts.py)
    attempts: tuple[AttemptRow, ...] = ()  # the earlier ones, oldest first (filled by Jobs.of_runs)
    ports: tuple[tuple[int, int], ...] = ()  # (host, container) the current attempt got on its agent

    @classmethod
    def of(cls, r: sqlite3.Row) -> JobRow:
        """A row of `SELECT j.*, a.name AS agent_name` (every column of jobs: `attempt` and `ports` included)."""
        return cls(
            id=r["id"],
            run_id=r["run_id"],
            job_name=r["job_name"],
            spec=r["spec"],
            status=_JOB_STATUS[r["status"]],
            # A dict lookup, not the enum's call (a few microseconds each, several per job of every GetRun).
            termination_reason=stored_reason(r["termination_reason"]),
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
            attempt=r["attempt"],
            ports=_ports(r["ports"]),
        )


_JOB_STATUS = {int(s): s for s in JobStatus}


# The waiting jobs as the engine's queue takes them (`Jobs.waiting`, `waiting_of`).
_WAITING_SQL = (
    "SELECT j.id, j.run_id, j.status, j.spec, j.depends_on, r.owner, r.priority, j.submitted_at, r.workflow,"
    " j.job_name, j.avoid_agent"
    " FROM jobs j JOIN runs r ON r.id = j.run_id"
    f" WHERE j.status IN ({ints_in(WAITING)})"
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
    submitted_at: int = 0
    workflow: str = ""
    job_name: str = ""
    avoid_agent: str = ""  # a requeued attempt's last agent: placed elsewhere when another fits
    run_name: str = ""  # filled where a message names the job (preemption)


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
    attempt: int = 1


@dataclass(frozen=True)
class JobLocation:
    id: str
    run_id: str
    run_name: str
    job_name: str
    agent_id: str | None
    status: JobStatus
    attempt: int = 1


@dataclass(frozen=True)
class Placement:
    job_id: str
    agent_id: str
    gpu_indices: list[int]
    master: str = ""  # a gang member's rendezvous: rank 0's agent's ADDRESS:PORT (coordinator/gangs.py)


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
    attempt: int = 1
    owner: str = ""  # the run's owner: the job gets the team's secrets and this user's own
    master: str = ""  # a gang member's rendezvous, ADDRESS:PORT ("" for a job of its own)


@dataclass
class UpdateResult:
    acks: list[UpdateAck] = field(default_factory=list)
    changed_runs: set[str] = field(default_factory=set)  # run ids whose status may have changed
    freed: bool = False  # capacity was released: the scheduler should look again
    requeued: list[str] = field(default_factory=list)  # jobs back to waiting as a new attempt
    added: list[object] = field(default_factory=list)  # what `Jobs.provide` returned: jobs a provider program added
    gangs: bool = False  # a report named a member of a gang: the gang sweep may have work (engine.settle_gangs)
    # Reports of attempts that are not the agent's acting ones, dropped unapplied (acknowledged all the same):
    # the report batch's screen (coordinator/reports.py) fills it.
    foreign: list[UpdateAck] = field(default_factory=list)


@dataclass(frozen=True)
class AttemptRow:
    job_id: str
    attempt: int
    agent_name: str
    status: JobStatus
    termination_reason: TerminationReason
    message: str
    started_at: int
    finished_at: int


@dataclass(frozen=True)
class StopOrder:
    """A job whose agent must stop it: the id its agent knows the attempt by (coordinator/attempts.py)."""

    wire_id: str
    agent_id: str


MAX_REPORTED_PORTS = 1024
# What a report of running writes: max_duration counts on the coordinator's clock from when the agent says it
# runs (:now + :limit), and the ports it published.
_RUNNING_SETS = "started_at = :t, deadline_at = CASE WHEN :limit > 0 THEN :now + :limit ELSE 0 END, ports = :ports"


def _reported_ports(u: JobUpdate) -> str:
    """What the agent says it published (bounded: a broken agent cannot grow the row without end)."""
    if not u.ports:  # most jobs publish none
        return "[]"
    ports = [[h, c] for h, c in u.ports if _valid_port(h) and _valid_port(c)]
    return json.dumps(ports[:MAX_REPORTED_PORTS])


class _NotAsRead(Exception):
    """A report batch found a row otherwise than it read it: applied again, message by message."""


REPORT_ROWS_BATCH = 500  # job ids per read of the rows an agent's reports name (SQLite's bound on variables)
_REPORT_COLUMNS = (
    "id, attempt, status, run_id, stop_requested, stop_reason, stop_message, gang, spec, cache_base, depends_on, inputs"
)


def _listed(text: str | None) -> bool:
    """Whether a JSON list column holds anything (as `bool(json_list(text))`, without parsing)."""
    return bool(text) and text != "[]" and bool(json_list(text))


def _valid_port(n: int) -> bool:
    return 1 <= n <= 65535


def _ports(text: str | None) -> tuple[tuple[int, int], ...]:
    """The stored [[host, container], ...] (an agent's report, checked when it was stored)."""
    if not text or text == "[]":
        return ()
    return tuple((int(h), int(c)) for h, c in json.loads(text))


def end_agent_jobs(
    c: sqlite3.Connection,
    agent_id: str,
    final: lifecycle.JobTransition,
    message: str,
    now: int,
    job_ids: Sequence[str] | None = None,
) -> list[str]:
    """The agent's jobs (those of `job_ids` only, if given) lost with it: each a new attempt where its
    `retry` lists agent-lost, else failed (`final`, its dependants too); returns the requeued ones."""
    sql = f"SELECT id FROM jobs WHERE agent_id = ? AND status IN ({ints_in(ON_AGENT)})"
    ids = [r[0] for r in c.execute(sql, [agent_id])]
    if job_ids is not None:
        ids = [j for j in ids if j in set(job_ids)]
    requeued, runs = [], set()
    for job_id in ids:
        moved, again = attempts.end_attempt(
            c,
            job_id,
            attempts.AGENT_LOST,
            final,
            lifecycle.REQUEUE_AGENT_LOST,
            reason=TerminationReason.AGENT_LOST if final.reason is None else final.reason,
            message=message,
            now=now,
        )
        if moved is not None:
            runs.add(moved.run_id)
            if again:
                requeued.append(job_id)
    for run_id in runs:
        lifecycle.fail_dependants(c, run_id, now)
        lifecycle.refresh_run_status(c, run_id, now)
    return requeued


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


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    run_name: str
    job_name: str
    owner: str
    workflow: str
    repository: str
    status: JobStatus
    submitted_at: int


class Jobs:
    def __init__(self, db: Db) -> None:
        self.db = db
        # Charges a job's fair-share usage in the transaction that ends it (store/usage.py), so that
        # the common end (an agent's report) needs no second write of the job's row.
        self.charge: Callable[[sqlite3.Connection, Sequence[str]], None] | None = None
        # Inserts the jobs a provider program reported with its DONE (job id, run id, encoded specs) into its run,
        # or raises CoordinatorError saying why not (coordinator/provided_jobs.py; set by the app's Core).
        self.provide: Callable[[sqlite3.Connection, str, str, Sequence[bytes]], object] | None = None
        self._limits: dict[tuple[str, int], float] = {}  # (job, deadline_at) -> max_duration (DB thread)
        # Job on an agent -> whether its spec says interruptible (a job's spec never changes): the jobs on
        # agents the last `any_preemptible_running` saw (DB thread).
        self._interruptible: dict[str, bool] = {}

    def of_runs(self, run_ids: Sequence[str]) -> dict[str, list[JobRow]]:
        out: dict[str, list[JobRow]] = {r: [] for r in run_ids}
        if not run_ids:
            return out
        rows = self.db.rows(
            "SELECT j.*, a.name AS agent_name FROM jobs j LEFT JOIN agents a ON a.id = j.agent_id"
            f" WHERE j.run_id IN ({marks(run_ids)}) ORDER BY j.submitted_at, j.rowid",
            list(run_ids),
        )
        jobs = [JobRow.of(r) for r in rows]
        earlier = self.attempts_of([j.id for j in jobs if j.attempt > 1])
        for j in jobs:
            out[j.run_id].append(replace(j, attempts=tuple(earlier.get(j.id, ()))) if j.id in earlier else j)
        return out

    def counts_by_status(self) -> dict[JobStatus, int]:
        rows = self.db.rows("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        return {JobStatus(r["status"]): r["n"] for r in rows}

    def queued(self, job_ids: Sequence[str]) -> dict[str, QueuedJob]:
        """The waiting jobs among `job_ids` (the engine's queue), with their runs' names and owners."""
        out: dict[str, QueuedJob] = {}
        ids = list(job_ids)
        for i in range(0, len(ids), 500):  # below SQLite's limit on bound parameters
            part = ids[i : i + 500]
            for r in self.db.rows(
                "SELECT j.id, j.job_name, j.status, j.submitted_at, r.name AS run_name, r.owner, r.workflow,"
                f" r.repository FROM jobs j JOIN runs r ON r.id = j.run_id WHERE j.id IN ({marks(part)})",
                part,
            ):
                out[r["id"]] = QueuedJob(
                    r["id"],
                    r["run_name"],
                    r["job_name"],
                    r["owner"],
                    r["workflow"],
                    r["repository"],
                    JobStatus(r["status"]),
                    r["submitted_at"],
                )
        return out

    def run_ids(self, job_ids: Sequence[str]) -> dict[str, str]:
        rows = self.db.rows(f"SELECT id, run_id FROM jobs WHERE id IN ({marks(job_ids)})", list(job_ids))
        return {r["id"]: r["run_id"] for r in rows}

    def location(self, job_id: str) -> JobLocation:
        r = self.db.row(
            "SELECT j.id, j.run_id, j.job_name, j.agent_id, j.status, j.attempt, r.name AS run_name FROM jobs j"
            " JOIN runs r ON r.id = j.run_id WHERE j.id = ?",
            [job_id],
        )
        if r is None:
            raise NotFound(f"job {job_id!r} does not exist")
        return JobLocation(
            r["id"], r["run_id"], r["run_name"], r["job_name"], r["agent_id"], JobStatus(r["status"]), r["attempt"]
        )

    # ---- scheduling --------------------------------------------------------------------------
    def waiting(self) -> list[WaitingJob]:
        return self._waiting(self.db.rows(_WAITING_SQL + " ORDER BY r.priority DESC, j.submitted_at, j.rowid"))

    def waiting_of(self, job_ids: Sequence[str]) -> list[WaitingJob]:
        """Of these jobs, those waiting: what `waiting` reads of them, by their keys (a requeue's read back costs
        its jobs, not the queue's depth: a whole `waiting` took ~80 ms of the DB thread at 10,000 queued)."""
        rows: list[sqlite3.Row] = []
        for i in range(0, len(job_ids), 500):
            part = list(job_ids[i : i + 500])
            rows += self.db.rows(_WAITING_SQL + f" AND j.id IN ({marks(part)})", part)
        return self._waiting(rows)

    @staticmethod
    def _waiting(rows: Sequence[sqlite3.Row]) -> list[WaitingJob]:
        return [
            WaitingJob(
                r["id"],
                r["run_id"],
                JobStatus(r["status"]),
                r["spec"],
                json_list(r["depends_on"]),
                r["owner"],
                r["priority"] or 0,
                r["submitted_at"],
                r["workflow"],
                r["job_name"],
                r["avoid_agent"] or "",
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
            # One statement per 500 placements, not one per job: a pass places thousands at scale.
            places = lifecycle.place_jobs(c, [(p.job_id, p.agent_id, p.gpu_indices, p.master) for p in placements])
            touched.update(m.run_id for m in places)
            placed_ids = {m.job_id for m in places}
            placed = [p for p in placements if p.job_id in placed_ids]  # the others were stopped meanwhile
            # What the agents need, read for the whole pass at once (a pass places thousands at scale);
            # inputs only for the jobs that have any (dependencies, input runs, an earlier attempt).
            for i in range(0, len(placed), 500):
                chunk = placed[i : i + 500]
                ids = [p.job_id for p in chunk]
                found = {
                    r[0]: r[1:]
                    for r in c.execute(
                        "SELECT j.id, j.spec, j.attempt, j.depends_on, j.inputs, r.name, r.code, r.owner"
                        f" FROM jobs j JOIN runs r ON r.id = j.run_id WHERE j.id IN ({marks(ids)})",
                        ids,
                    )
                }
                for p in chunk:
                    spec, attempt, depends_on, job_inputs, name, code, owner = found[p.job_id]
                    # Most jobs have neither: their empty lists are told by the text, not parsed per job.
                    inputs = inputs_of(c, p.job_id) if _listed(depends_on) or _listed(job_inputs) else []
                    if attempt > 1:
                        inputs += attempts.resume_inputs(c, p.job_id)
                    out.append(
                        Assignment(
                            p.job_id, p.agent_id, name, spec, code, p.gpu_indices, inputs, attempt, owner, p.master
                        )
                    )
            touched.update(m.run_id for m in lifecycle.move_each(c, lifecycle.MARK_PENDING, list(waiting)))
            for job_id, why in failures:
                failed = lifecycle.move_job(c, lifecycle.UNSCHEDULABLE, job_id, message=why, at=now)
                if failed is not None:
                    touched.add(failed.run_id)
                    lifecycle.fail_dependants(c, failed.run_id, now)
            lifecycle.refresh_run_statuses(c, touched, now)
        return out

    def assignments_for_agent(self, agent_id: str, job_ids: Sequence[str]) -> list[Assignment]:
        if not job_ids:
            return []
        rows = self.db.rows(
            "SELECT j.id, j.spec, j.gpu_indices, j.attempt, j.master, r.name, r.code, r.owner"
            " FROM jobs j JOIN runs r ON r.id = j.run_id"
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
                inputs_of(self.db.conn, r["id"]) + attempts.resume_inputs(self.db.conn, r["id"], r["attempt"]),
                r["attempt"],
                r["owner"],
                r["master"] or "",
            )
            for r in rows
        ]

    def gang_ports(self, agent_id: str) -> set[int]:
        """The MASTER_PORTs of the gangs whose rank 0 is on the agent now."""
        rows = self.db.rows(
            f"SELECT master FROM jobs WHERE gang != '' AND status IN ({ints_in(ON_AGENT)}) AND agent_id = ?"
            " AND node_rank = 0",
            [agent_id],
        )
        return {int(port) for r in rows if (port := (r["master"] or "").rpartition(":")[2]).isdigit()}

    def settle_gangs(self) -> GangSettlement:
        """The gang sweep (coordinator/store/gangs.py), in one transaction."""
        with self.db.tx() as c:
            return settle(c, self.db.clock())

    # ---- an agent's jobs ---------------------------------------------------------------------
    def on_agent(self, agent_id: str) -> list[AgentJob]:
        rows = self.db.rows(
            "SELECT id, status, stop_requested, attempt FROM jobs"
            f" WHERE agent_id = ? AND status IN ({ints_in(ON_AGENT)})",
            [agent_id],
        )
        return [AgentJob(r["id"], JobStatus(r["status"]), bool(r["stop_requested"]), r["attempt"]) for r in rows]

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

    def stop_unstarted(self, job_ids: Sequence[str]) -> list[str]:
        """Jobs stopped while their agent was away, which came back without having started them; a
        preempted one is requeued as a new attempt (returned) as if its agent had stopped it."""
        if not job_ids:
            return []
        requeued: list[str] = []
        with self.db.tx() as c:
            now = self.db.clock()
            runs = set()
            for job_id in job_ids:
                row = c.execute("SELECT stop_reason, stop_message FROM jobs WHERE id = ?", [job_id]).fetchone()
                if row is not None and row[0] == TerminationReason.PREEMPTED:
                    moved, again = attempts.end_attempt(
                        c,
                        job_id,
                        attempts.PREEMPTED,
                        lifecycle.AGENT_PREEMPTED,
                        lifecycle.REQUEUE_PREEMPTED,
                        reason=TerminationReason.PREEMPTED,
                        message=row[1] or "preempted",
                        now=now,
                    )
                    if again:
                        requeued.append(job_id)
                else:
                    moved = lifecycle.move_job(c, lifecycle.STOP_UNSTARTED, job_id, message="stopped by user", at=now)
                if moved is not None:
                    runs.add(moved.run_id)
            for run_id in runs:
                lifecycle.fail_dependants(c, run_id, now)
                lifecycle.refresh_run_status(c, run_id, now)
        return requeued

    def fail_lost_by_agent(self, agent_id: str, job_ids: Sequence[str]) -> list[str]:
        """Jobs the agent came back without: failed, or requeued (returned) where `retry` says so."""
        if not job_ids:
            return []
        with self.db.tx() as c:
            message = "the agent restarted and no longer has this job"
            return end_agent_jobs(c, agent_id, lifecycle.LOST_BY_AGENT, message, self.db.clock(), job_ids)

    def fail_undelivered(self, jobs: Sequence[tuple[str, int, str, str]]) -> list[str]:
        """Placed jobs whose assignment could not be built (job id, attempt, agent id, why): FAILED, with their
        dependants, if that attempt is still ASSIGNED to that agent (a later attempt, or one the agent reported
        on, is left alone). Returns the runs changed."""
        if not jobs:
            return []
        runs: set[str] = set()
        with self.db.tx() as c:
            now = self.db.clock()
            for job_id, attempt, agent_id, why in jobs:
                where = "id = :id AND attempt = :attempt AND agent_id = :agent"
                params = {"id": job_id, "attempt": attempt, "agent": agent_id}
                moved = lifecycle.move_jobs(c, lifecycle.UNDELIVERABLE, where, params, message=why, at=now)
                runs.update(m.run_id for m in moved)
            for run_id in runs:
                lifecycle.fail_dependants(c, run_id, now)
                lifecycle.refresh_run_status(c, run_id, now)
        return sorted(runs)

    def apply_updates(self, agent_id: str, updates: Sequence[JobUpdate]) -> UpdateResult:
        """An agent's reports, each acknowledged; stale or repeated ones change nothing."""
        res = UpdateResult()
        charge_now: list[str] = []  # ended by this report: their usage is charged in this transaction
        with self.db.tx() as c:
            self._apply_reports(c, agent_id, updates, res, charge_now)
            # Once per run, however many of its jobs changed.
            lifecycle.refresh_run_statuses(c, res.changed_runs, self.db.clock())
            if charge_now and self.charge is not None:
                self.charge(c, charge_now)
        return res

    def apply_updates_many(
        self,
        reports: Sequence[tuple[str, Sequence[JobUpdate]]],
        first: Callable[[int], None] | None = None,
    ) -> list[UpdateResult | Exception]:
        """Many agents' messages of reports (agent id, its updates in order), in one transaction: each as
        `apply_updates` applies it, so that one that fails (its error in its place in the answer; its agent
        gets no acknowledgement and sends it again) undoes only its own changes. What is per report today
        but need not be is done once for all of them: the runs they changed are refreshed in one read
        (lifecycle.refresh_run_statuses), and the jobs they ended are charged in one.
        `first(k)`: what else the k-th message writes before its reports, in the same undo unit (the run
        records' environments reported with them, coordinator/reports.py); never a job's row.

        Optimistic: the batch is first applied with no savepoint per message (two of the ~4.5 statements a
        brief job cost). Only when a message fails is all of it undone and applied again, each message in a
        savepoint of its own, so the failing one still undoes only itself. Everything it writes is in the
        database (the results are built afresh), so the second try starts from what the first found.

        The rows the messages name are read once for the batch (`_batch_rows`), not once per message: a
        message finds its rows there as its own read would have found them, for as long as no message
        before it in the batch did more than move its own jobs (see `_apply_messages`)."""
        with self.db.tx() as c:
            c.execute("SAVEPOINT report_batch")
            try:
                out, runs, charge_now = self._apply_messages(c, reports, first, each_in_savepoint=False)
            except Exception:  # some message failed: which one, the second try finds out
                c.execute("ROLLBACK TO report_batch")
                c.execute("RELEASE report_batch")
                out, runs, charge_now = self._apply_messages(c, reports, first, each_in_savepoint=True)
            else:
                c.execute("RELEASE report_batch")
            lifecycle.refresh_run_statuses(c, runs, self.db.clock())
            if charge_now and self.charge is not None:
                self.charge(c, charge_now)
        return out

    def _apply_messages(
        self,
        c: sqlite3.Connection,
        reports: Sequence[tuple[str, Sequence[JobUpdate]]],
        first: Callable[[int], None] | None,
        *,
        each_in_savepoint: bool,
    ) -> tuple[list[UpdateResult | Exception], set[str], list[str]]:
        """The messages' results, the runs they changed and the jobs they ended. Without savepoints a
        message's error is raised (the caller undoes the batch); with, it is undone alone and its error
        takes its place in the results while the others go on."""
        out: list[UpdateResult | Exception] = []
        runs: set[str] = set()
        charge_now: list[str] = []
        # Optimistic only (the second try, after a failure, reads each message's rows as it comes): each
        # message's rows are then what its own read would find for as long as every message before it moved
        # only its own jobs (`first` writes no job's row). One that did more (requeued, failed dependants,
        # added a provider's jobs, was refused as stored) ends its use: the messages after it read their own.
        batch_rows = None if each_in_savepoint else self._batch_rows(c, reports)
        # Optimistic only (a failure undoes the batch anyway): consecutive messages that are each a brief
        # job's RUNNING and DONE, plainly (`_plain_ran_and_done`), are written by one UPDATE, each as
        # `_ran_and_done` writes it, once the next message that is not one comes (they touch their own row
        # only, so that is as if each was written in turn).
        group: list[list[Any]] = []
        for agent_id, updates in reports:
            res, ended = UpdateResult(), list[str]()
            plain = None if each_in_savepoint else self._plain_ran_and_done(agent_id, updates, batch_rows)
            if plain is not None:
                if first is not None:
                    first(len(out))
                job_id, row = plain
                key = (key_without_inputs(row[8], row[9], row[10]) or "") if row[8] else ""
                group.append(self._done_values(job_id, updates[0], updates[1], row[7], key))
                row[1] = int(JobStatus.DONE)  # as it will be stored (a failed write undoes the batch)
                res.acks += [UpdateAck(u.job_id, u.status) for u in updates]
                res.freed, res.gangs = True, bool(row[6])
                res.changed_runs.add(row[2])
                out.append(res)
                runs.add(row[2])
                charge_now.append(job_id)
                continue
            if group:
                self._ran_and_done_many(c, group)
                group = []
            if each_in_savepoint:
                c.execute("SAVEPOINT reports")
            try:
                if first is not None:
                    first(len(out))
                if not self._apply_reports(c, agent_id, updates, res, ended, batch_rows):
                    batch_rows = None
            except Exception as e:  # its own: handed back in its place, the others go on
                if not each_in_savepoint:
                    raise
                c.execute("ROLLBACK TO reports")
                c.execute("RELEASE reports")
                out.append(e)
                continue
            if each_in_savepoint:
                c.execute("RELEASE reports")
            out.append(res)
            runs |= res.changed_runs
            charge_now += ended
        if group:
            self._ran_and_done_many(c, group)
        return out, runs, charge_now

    @staticmethod
    def _plain_ran_and_done(
        agent_id: str, updates: Sequence[JobUpdate], batch_rows: dict[str, tuple[str, list[Any]]] | None
    ) -> tuple[str, list[Any]] | None:
        """(job id, its row) when the message is exactly one job's RUNNING then DONE that `_apply_reports`
        would write as one `_ran_and_done` and nothing else: the agent's current attempt, in a state a
        report of running leaves from, not asked to stop, no provider's jobs, and a step-cache key (if any)
        that reads nothing (no inputs: a key that reads its inputs is read in the message's own turn, after
        the messages before it are written). Else None: applied as `_apply_reports` does."""
        if batch_rows is None or len(updates) != 2:
            return None
        ran, done = updates
        if ran.status != JobStatus.RUNNING or done.status != JobStatus.DONE or done.job_id != ran.job_id:
            return None
        if done.provided_jobs:
            return None
        job_id, attempt = parse_wire_job_id(ran.job_id)
        found = batch_rows.get(job_id)
        if found is None or found[0] != agent_id:
            return None
        row = found[1]
        if row[0] != attempt or row[3]:  # attempt, stop_requested
            return None
        if row[8] and key_without_inputs(row[8], row[9], row[10]) is None:  # cache_base, depends_on, inputs
            return None
        if lifecycle.agent_transition(ran.status, False) is not lifecycle.AGENT_RUNNING:
            return None
        if lifecycle.agent_transition(done.status, False) is not lifecycle.AGENT_DONE:
            return None
        return (job_id, row) if row[1] in lifecycle.AGENT_RUNNING.src else None

    def _done_values(
        self, job_id: str, ran: JobUpdate, done: JobUpdate, spec: bytes | None, cache_key: str
    ) -> list[Any]:
        """A row of `_ran_and_done_many`: the values `_ran_and_done` writes for this job."""
        now = self.db.clock()
        t = lifecycle.AGENT_DONE
        reason = t.reason if t.reason is not None else done.termination_reason
        if reason is None:
            raise ValueError(f"transition {t.name} ends the job: it needs a termination reason")
        limit = common_pb2.JobSpec.FromString(spec).max_duration_s * 1_000_000_000 if spec else 0
        at = done.time_ns or now
        ports = _reported_ports(ran)
        return [job_id, int(reason), done.message, at, ran.time_ns or now, done.exit_code, ports, limit, now, cache_key]

    def _ran_and_done_many(self, c: sqlite3.Connection, rows: Sequence[Sequence[Any]]) -> None:
        """`_ran_and_done` for many jobs (rows of `_done_values`), one UPDATE per 500. A job that does not move
        (its row is not as the batch read it) raises: the batch is applied again message by message."""
        also = (
            "started_at = v._t, deadline_at = CASE WHEN v._limit > 0 THEN v._now + v._limit ELSE 0 END,"
            " ports = v._ports, exit_code = COALESCE(v._e, exit_code),"
            " cache_key = CASE WHEN v._ck = '' THEN cache_key ELSE v._ck END"
        )
        if self.charge is not None:
            also += ", usage_charged = 1"
        moved = lifecycle.move_jobs_each(
            c,
            lifecycle.AGENT_DONE,
            f"jobs.status IN ({ints_in(lifecycle.AGENT_RUNNING.src)})",
            ("_t", "_e", "_ports", "_limit", "_now", "_ck"),
            rows,
            also,
        )
        if len(moved) != len(rows):
            raise _NotAsRead(f"{len(rows) - len(moved)} of {len(rows)} jobs not as their batch read them")

    def _batch_rows(
        self, c: sqlite3.Connection, reports: Sequence[tuple[str, Sequence[JobUpdate]]]
    ) -> dict[str, tuple[str, list[Any]]] | None:
        """`_report_rows` for a whole batch in one read per REPORT_ROWS_BATCH ids: job id -> (its agent, its
        row) for every job the messages name. None (each message reads its own) when two messages name
        the same job: the later one must see what the earlier one wrote, or for a batch of one message."""
        if len(reports) < 2:
            return None
        ids: set[str] = set()
        for _, updates in reports:
            mine = {parse_wire_job_id(u.job_id)[0] for u in updates}
            if not ids.isdisjoint(mine):
                return None
            ids |= mine
        ordered = sorted(ids)
        out: dict[str, tuple[str, list[Any]]] = {}
        for i in range(0, len(ordered), REPORT_ROWS_BATCH):
            chunk = ordered[i : i + REPORT_ROWS_BATCH]
            for r in c.execute(
                f"SELECT {_REPORT_COLUMNS}, agent_id FROM jobs WHERE id IN ({marks(chunk)})",
                chunk,
            ):
                out[r[0]] = (r[-1], list(r[1:-1]))
        return out

    def _report_rows(self, c: sqlite3.Connection, agent_id: str, updates: Sequence[JobUpdate]) -> dict[str, list[Any]]:
        """The rows the reports name that are this agent's, read in one query (not one per report): job id ->
        [attempt, status, run_id, stop_requested, stop_reason, stop_message, gang, spec, cache_base, depends_on,
        inputs]. An agent's RUNNING and DONE of one job come in one message when it runs briefly."""
        ids = sorted({parse_wire_job_id(u.job_id)[0] for u in updates})
        out: dict[str, list[Any]] = {}
        for i in range(0, len(ids), REPORT_ROWS_BATCH):
            chunk = ids[i : i + REPORT_ROWS_BATCH]
            for r in c.execute(
                f"SELECT {_REPORT_COLUMNS} FROM jobs WHERE id IN ({marks(chunk)}) AND agent_id = ?",
                [*chunk, agent_id],
            ):
                out[r[0]] = list(r[1:])
        return out

    def _apply_reports(
        self,
        c: sqlite3.Connection,
        agent_id: str,
        updates: Sequence[JobUpdate],
        res: UpdateResult,
        charge_now: list[str],
        batch_rows: dict[str, tuple[str, list[Any]]] | None = None,
    ) -> bool:
        """`apply_updates`' reports, in order, into `res` (and `charge_now`: the jobs they ended, to charge);
        the runs they changed are left to the caller to refresh, once each. `batch_rows`: the rows of its
        batch, read before it (`_batch_rows`), its own among them, instead of a read of its own.
        Whether it moved only the jobs it names, and each as its rows said (else other rows may have moved:
        a batch's rows read before it are not what a message after it would read)."""
        rows: dict[str, list[Any]] | None = None
        if batch_rows is not None:
            rows = {}
            for u in updates:
                job_id = parse_wire_job_id(u.job_id)[0]
                found = batch_rows.get(job_id)
                if found is not None and found[0] == agent_id:
                    rows[job_id] = found[1]
        only_its_own = True
        written_with: JobUpdate | None = None  # a report applied with the one before it (`_ran_and_done`)
        for i, u in enumerate(updates):
            res.acks.append(UpdateAck(u.job_id, u.status))  # acknowledged by the id the agent sent
            if u is written_with:
                written_with = None
                continue
            job_id, attempt = parse_wire_job_id(u.job_id)
            if rows is None:  # the first report; or after one whose side effects may have moved other rows
                rows = self._report_rows(c, agent_id, updates[i:])
            row = rows.get(job_id)
            if row is None or row[0] != attempt:
                continue  # not this agent's job, or an attempt that is over: a late report changes nothing
            _, status, run_id, stop_requested, stop_reason, stop_message, gang, spec, cache_base, depends_on, inputs = (
                row
            )
            res.gangs = res.gangs or bool(gang)
            if job_id != u.job_id:
                u = replace(u, job_id=job_id)
            t = lifecycle.agent_transition(u.status, bool(stop_requested))
            if t is None or status not in t.src:
                lifecycle.refuse_job(u.job_id, status, u.status, "agent report")
                continue
            done = self._done_next(t, updates, i, bool(stop_requested))
            if done is not None:
                # Ran and ended done in one message (a brief job): both in one write, as one after the other.
                key = key_of_row(c, cache_base, run_id, depends_on, inputs) if cache_base else ""
                if self._ran_and_done(c, u, done if done.job_id == job_id else replace(done, job_id=job_id), spec, key):
                    written_with = done
                    row[1] = int(JobStatus.DONE)
                    res.freed = True
                    charge_now.append(job_id)
                else:
                    rows, only_its_own = None, False  # refused as stored: read again
                res.changed_runs.add(run_id)
                continue
            added: object = None
            if t.dst == JobStatus.DONE and u.provided_jobs:
                rows, only_its_own = (
                    None,
                    False,
                )  # a provider's jobs join the run: read the rows again for the reports after this one
                # Its jobs join the run in this step, before the run's status is derived (it is not over);
                # refused, the program's job fails instead, saying why.
                c.execute("SAVEPOINT provided")
                try:
                    if self.provide is None:
                        raise CoordinatorError("this coordinator takes no jobs from provider programs")
                    added = self.provide(c, job_id, run_id, u.provided_jobs)
                    c.execute("RELEASE provided")
                except CoordinatorError as e:
                    c.execute("ROLLBACK TO provided")
                    c.execute("RELEASE provided")
                    u = replace(
                        u,
                        status=JobStatus.FAILED,
                        termination_reason=TerminationReason.EXECUTOR_ERROR,
                        message=f"the provider's jobs are refused: {e}",
                    )
                    t = lifecycle.agent_transition(u.status, bool(stop_requested))
                    if t is None or status not in t.src:
                        continue
                if added is not None:
                    res.added.append(added)
            ended = self._end_attempt(c, t, u, stop_reason, stop_message or "")
            if ended is not None:
                rows, only_its_own = None, False  # requeued, or its dependants failed: other rows may have moved
                res.freed = True
                if ended:
                    res.requeued.append(job_id)
                res.changed_runs.add(run_id)
                continue
            # A job that finishes done feeds the step cache: its whole key is written with its end.
            key = (
                key_of_row(c, cache_base, run_id, depends_on, inputs) if t.dst == JobStatus.DONE and cache_base else ""
            )
            if self._apply(c, t, u, spec if t.dst == JobStatus.RUNNING else None, key):
                row[1] = int(t.dst)  # as stored now: a later report of this job in the message moves on from it
                if t.dst in TERMINAL_JOB:
                    res.freed = True
                    charge_now.append(u.job_id)
                    if t.dst != JobStatus.DONE:
                        rows, only_its_own = None, False  # its dependants failed: other rows may have moved
                        lifecycle.fail_dependants(c, run_id, self.db.clock())
            else:
                rows, only_its_own = None, False  # refused as stored: read again, as each report did before
            res.changed_runs.add(run_id)
        return only_its_own

    @staticmethod
    def _done_next(
        t: lifecycle.JobTransition, updates: Sequence[JobUpdate], i: int, stop_requested: bool
    ) -> JobUpdate | None:
        """The report after updates[i] when updates[i] says its job runs and that one says the same attempt
        ended done, plainly (no provider's jobs; not a stop the coordinator asked for); else None."""
        if t is not lifecycle.AGENT_RUNNING or i + 1 >= len(updates):
            return None
        ran, nxt = updates[i], updates[i + 1]
        if nxt.job_id != ran.job_id or nxt.status != JobStatus.DONE or nxt.provided_jobs:
            return None
        return nxt if lifecycle.agent_transition(nxt.status, stop_requested) is lifecycle.AGENT_DONE else None

    def _ran_and_done(
        self, c: sqlite3.Connection, ran: JobUpdate, done: JobUpdate, spec: bytes | None, cache_key: str
    ) -> bool:
        """`ran` (RUNNING) and `done` (DONE) of one job as one UPDATE: the columns `_apply` writes for each,
        the move to done only from the states a report of running leaves (so it is refused where the
        first of the two would be)."""
        now = self.db.clock()
        params: dict[str, object] = {"_id": ran.job_id, "t": ran.time_ns or now, "e": done.exit_code, "now": now}
        also = _RUNNING_SETS + ", exit_code = COALESCE(:e, exit_code)"
        params["ports"] = _reported_ports(ran)
        params["limit"] = common_pb2.JobSpec.FromString(spec).max_duration_s * 1_000_000_000 if spec else 0
        if self.charge is not None:
            also += ", usage_charged = 1"
        if cache_key:
            also += ", cache_key = :ck"
            params["ck"] = cache_key
        moved = lifecycle.move_jobs(
            c,
            lifecycle.AGENT_DONE,
            f"id = :_id AND status IN ({ints_in(lifecycle.AGENT_RUNNING.src)})",
            params,
            reason=done.termination_reason,
            message=done.message,
            at=done.time_ns or now,
            also=also,
        )
        return bool(moved)

    def _end_attempt(
        self, c: sqlite3.Connection, t: lifecycle.JobTransition, u: JobUpdate, stop_reason: int, stop_message: str
    ) -> bool | None:
        """A report that ends the attempt other than as the agent sees it: stopped by the coordinator
        (preempted, max_duration), failed with `retry.on: [error]`, or failed for its agent's full disk.
        None: not such a report;
        else whether the job was requeued as a new attempt."""
        if t.dst not in (JobStatus.FAILED, JobStatus.STOPPED):
            return None
        now = self.db.clock()
        also, params = "exit_code = COALESCE(:e, exit_code)", {"e": u.exit_code}
        if stop_reason == TerminationReason.MAX_DURATION:
            moved = lifecycle.move_job(
                c, lifecycle.AGENT_MAX_DURATION, u.job_id, message=stop_message, at=now, also=also, params=params
            )
            if moved is not None:
                lifecycle.fail_dependants(c, moved.run_id, now)
            return False
        if stop_reason == TerminationReason.PREEMPTED:
            cause, final, requeue = attempts.PREEMPTED, lifecycle.AGENT_PREEMPTED, lifecycle.REQUEUE_PREEMPTED
            reason, message = TerminationReason.PREEMPTED, stop_message or "preempted"
        elif t is lifecycle.AGENT_FAILED and u.termination_reason == TerminationReason.DISK_FULL:
            # Its agent's disk, not its code: another agent, within a bound (lifecycle/attempts.py).
            cause, final, requeue = attempts.DISK_FULL, lifecycle.AGENT_FAILED, lifecycle.REQUEUE_DISK_FULL
            reason, message = TerminationReason.DISK_FULL, u.message
        elif t is lifecycle.AGENT_FAILED and u.termination_reason == TerminationReason.EXIT_CODE:
            cause, final, requeue = attempts.ERROR, lifecycle.AGENT_FAILED, lifecycle.REQUEUE_ERROR
            reason, message = TerminationReason.EXIT_CODE, u.message
        elif t is lifecycle.AGENT_FAILED and u.termination_reason == TerminationReason.AGENT_LOST:
            # The agent stopped it itself, its lease run out (agent/lease.py) before the coordinator lost it
            # (it heard the agent, the agent did not hear back): requeued like a loss, where `retry` says so.
            cause, final, requeue = attempts.AGENT_LOST, lifecycle.AGENT_FAILED, lifecycle.REQUEUE_AGENT_LOST
            reason, message = TerminationReason.AGENT_LOST, u.message
        else:
            return None
        moved, again = attempts.end_attempt(
            c, u.job_id, cause, final, requeue, reason=reason, message=message, now=now, also=also, params=params
        )
        if moved is not None and not again:
            lifecycle.fail_dependants(c, moved.run_id, now)
        return again

    def _apply(
        self, c: sqlite3.Connection, t: lifecycle.JobTransition, u: JobUpdate, spec: bytes | None, cache_key: str = ""
    ) -> bool:
        """`spec`: the job's stored spec, read with its row for a report of running (else None);
        `cache_key`: its step-cache key, written with a report of done."""
        at = u.time_ns or self.db.clock()
        params: dict[str, object] = {"t": at, "e": u.exit_code, "now": self.db.clock()}
        if t.dst == JobStatus.PULLING:
            also = ""
        elif t.dst == JobStatus.RUNNING:
            also = _RUNNING_SETS
            params["ports"] = _reported_ports(u)
            params["limit"] = common_pb2.JobSpec.FromString(spec).max_duration_s * 1_000_000_000 if spec else 0
        elif t.dst == JobStatus.UPLOADING:
            also = "exit_code = :e, started_at = COALESCE(started_at, :t)"
        else:
            # Ended: its usage is charged in this transaction (apply_updates), so it is marked counted.
            also = "exit_code = COALESCE(:e, exit_code)"
            if self.charge is not None:
                also += ", usage_charged = 1"
            if cache_key and t.dst == JobStatus.DONE:
                also += ", cache_key = :ck"
                params["ck"] = cache_key
        # A job the user asked to stop ends stopped, however its agent saw the end.
        message = "stopped by user" if t is lifecycle.AGENT_STOPPED_ON_REQUEST else u.message
        moved = lifecycle.move_job(
            c, t, u.job_id, reason=u.termination_reason, message=message, at=at, also=also, params=params
        )
        return moved is not None

    # ---- attempts: preemption, max_duration, history --------------------------------------------
    def request_preempt(self, job_ids: Sequence[str], message: str) -> list[StopOrder]:
        """Marks interruptible jobs on agents to be preempted (a user's stop already asked wins);
        returns what their agents must stop. Jobs that are not interruptible are left alone."""
        out: list[StopOrder] = []
        with self.db.tx() as c:
            for job_id in job_ids:
                row = c.execute(
                    f"SELECT spec FROM jobs WHERE id = ? AND status IN ({ints_in(ON_AGENT)}) AND stop_requested = 0",
                    [job_id],
                ).fetchone()
                if row is None or not common_pb2.JobSpec.FromString(row[0]).resources.interruptible:
                    continue
                r = c.execute(
                    "UPDATE jobs SET stop_requested = 1, stop_reason = ?, stop_message = ? WHERE id = ?"
                    " RETURNING attempt, agent_id",
                    [int(TerminationReason.PREEMPTED), message, job_id],
                ).fetchone()
                out.append(StopOrder(wire_job_id(job_id, r[0]), r[1]))
        return out

    def with_max_duration(self) -> list[tuple[str, int, int, float]]:
        """Jobs on agents with a max_duration not yet asked to stop: (id, started_at, when the
        coordinator saw them start as a wall stamp, the limit in seconds). The engine times them on
        the monotonic clock (coordinator/elapsed.py); the stored deadline is `seen + limit`."""
        rows = self.db.rows(
            f"SELECT id, started_at, deadline_at FROM jobs WHERE status IN ({ints_in(ON_AGENT)})"
            " AND deadline_at > 0 AND stop_requested = 0"
        )
        # Asked every second: each job's limit is read from its spec once (a new attempt has a new deadline).
        known, self._limits = self._limits, {}
        out = []
        for r in rows:
            key = (r["id"], r["deadline_at"])
            limit = known.get(key)
            if limit is None:
                spec = self.db.row("SELECT spec FROM jobs WHERE id = ?", [r["id"]])
                limit = float(common_pb2.JobSpec.FromString(spec[0]).max_duration_s) if spec else 0.0
            self._limits[key] = limit
            out.append((r["id"], r["started_at"] or 0, r["deadline_at"] - int(limit * 1e9), limit))
        return out

    def stop_for_max_duration(self, job_ids: Sequence[str]) -> list[StopOrder]:
        """Marks these jobs (still on agents, not yet asked to stop) to stop for their max_duration;
        returns what their agents must stop."""
        out: list[StopOrder] = []
        with self.db.tx() as c:
            for job_id in job_ids:
                row = c.execute(
                    f"SELECT spec FROM jobs WHERE id = ? AND status IN ({ints_in(ON_AGENT)}) AND stop_requested = 0",
                    [job_id],
                ).fetchone()
                if row is None:
                    continue
                limit = format_duration(common_pb2.JobSpec.FromString(row[0]).max_duration_s)
                r = c.execute(
                    "UPDATE jobs SET stop_requested = 1, stop_reason = ?, stop_message = ? WHERE id = ?"
                    " RETURNING attempt, agent_id",
                    [int(TerminationReason.MAX_DURATION), f"max_duration {limit} exceeded", job_id],
                ).fetchone()
                out.append(StopOrder(wire_job_id(job_id, r[0]), r[1]))
        return out

    def starved_among(self, job_ids: Sequence[str]) -> list[WaitingJob]:
        """Of these waiting jobs (those that waited long enough, timed by the engine), the ones
        preemption may serve: as `starved`."""
        out: list[WaitingJob] = []
        ids = list(job_ids)
        for i in range(0, len(ids), 5000):
            chunk = ids[i : i + 5000]
            out += self._starved(f"j.id IN ({marks(chunk)})", chunk)
        out.sort(key=lambda w: w.submitted_at)
        return out

    def _starved(self, where: str, params: Sequence[object]) -> list[WaitingJob]:
        rows = self.db.rows(
            "SELECT j.id, j.run_id, j.status, j.spec, j.depends_on, r.owner, r.priority, j.avoid_agent,"
            " j.submitted_at, j.job_name, r.name AS run_name FROM jobs j JOIN runs r ON r.id = j.run_id"
            f" WHERE j.status IN ({ints_in(WAITING)}) AND {where} ORDER BY j.submitted_at, j.rowid",
            list(params),
        )
        out = []
        for r in rows:
            if common_pb2.JobSpec.FromString(r["spec"]).resources.interruptible:
                continue
            deps = json_list(r["depends_on"])
            if deps:
                statuses = self.dependency_statuses([r["run_id"]])
                if any(statuses.get((r["run_id"], d)) != JobStatus.DONE for d in deps):
                    continue
            out.append(
                WaitingJob(
                    r["id"],
                    r["run_id"],
                    JobStatus(r["status"]),
                    r["spec"],
                    deps,
                    r["owner"],
                    r["priority"] or 0,
                    submitted_at=r["submitted_at"] or 0,
                    job_name=r["job_name"] or "",
                    avoid_agent=r["avoid_agent"] or "",
                    run_name=r["run_name"] or "",
                )
            )
        return out

    def any_preemptible_running(self) -> bool:
        """Whether a job on an agent is interruptible and not already being preempted: what the preemption
        policy could take (`running_for_preemption`), asked every second by the lease loop. Why not that
        call (issue 16): it built a record per job on an agent and parsed each one's spec, 5,000 of each a
        second at full size, only to find, in the common case, that no job may be preempted. Here a row is
        a plain tuple and a spec is read and parsed once per job (remembered for the jobs on agents now):
        the spec's bytes were most of what the read cost when they came with every row."""
        rows = self.db.conn.execute(
            "SELECT j.id, j.stop_requested, j.stop_reason, j.agent_id FROM jobs j"
            f" WHERE j.status IN ({ints_in(ON_AGENT)})"
        ).fetchall()
        known, seen = self._interruptible, {}
        self._learn_interruptible([job_id for job_id, _, _, agent_id in rows if agent_id and job_id not in known])
        found = False
        for job_id, stop_requested, stop_reason, agent_id in rows:
            if not agent_id:
                continue
            interruptible = known.get(job_id)
            if interruptible is None:
                continue  # gone between the two reads: on no agent
            seen[job_id] = interruptible
            being_preempted = bool(stop_requested) and stop_reason == TerminationReason.PREEMPTED
            found = found or (interruptible and not being_preempted)
        self._interruptible = seen
        return found

    def _learn_interruptible(self, job_ids: Sequence[str]) -> None:
        """Whether each of these jobs' specs says interruptible, read and parsed once, into `_interruptible`."""
        for i in range(0, len(job_ids), 5000):
            chunk = job_ids[i : i + 5000]
            for job_id, spec in self.db.conn.execute(f"SELECT id, spec FROM jobs WHERE id IN ({marks(chunk)})", chunk):
                self._interruptible[job_id] = common_pb2.JobSpec.FromString(spec).resources.interruptible

    def running_for_preemption(self) -> list[RunningJob]:
        """The jobs on agents as the preemption policy sees them. Whether each is interruptible is what
        `any_preemptible_running` (asked just before, in the same check) remembered: a spec is read and
        parsed only for a job it has not seen."""
        rows = self.db.rows(
            "SELECT j.id, j.agent_id, j.cpu, j.memory, j.gpu_indices, j.stop_requested, j.stop_reason,"
            " j.started_at, r.owner FROM jobs j JOIN runs r ON r.id = j.run_id"
            f" WHERE j.status IN ({ints_in(ON_AGENT)})"
        )
        known = self._interruptible
        self._learn_interruptible([r["id"] for r in rows if r["agent_id"] and r["id"] not in known])
        return [
            RunningJob(
                job_id=r["id"],
                agent_id=r["agent_id"],
                cpu=r["cpu"] or 0.0,
                memory=r["memory"] or 0,
                gpu_indices=tuple(json_list(r["gpu_indices"])),
                interruptible=known[r["id"]],
                being_preempted=bool(r["stop_requested"]) and r["stop_reason"] == TerminationReason.PREEMPTED,
                owner=r["owner"] or "",
                started_ns=r["started_at"] or 0,
            )
            for r in rows
            if r["agent_id"] and r["id"] in known
        ]

    def attempts_of(self, job_ids: Sequence[str]) -> dict[str, list[AttemptRow]]:
        """The earlier attempts of jobs, oldest first."""
        out: dict[str, list[AttemptRow]] = {}
        if not job_ids:
            return out
        sql = (
            "SELECT t.*, a.name AS agent_name FROM job_attempts t LEFT JOIN agents a ON a.id = t.agent_id"
            f" WHERE t.job_id IN ({marks(job_ids)}) ORDER BY t.job_id, t.attempt"
        )
        for r in self.db.rows(sql, list(job_ids)):
            out.setdefault(r["job_id"], []).append(
                AttemptRow(
                    r["job_id"],
                    r["attempt"],
                    r["agent_name"] or "",
                    JobStatus(r["status"]),
                    termination_reason(r["termination_reason"]),
                    r["message"] or "",
                    r["started_at"] or 0,
                    r["finished_at"] or 0,
                )
            )
        return out


def format_duration(seconds: int) -> str:
    """As a workflow would write it: 2h, 30m, 90s, 1h30m."""
    if seconds <= 0:
        return "0s"
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out += f"{seconds // size}{unit}"
            seconds %= size
    return out
