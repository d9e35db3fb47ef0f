"""The job and run state machine: every allowed transition in one table, and the only code that
writes a job's or a run's status.

Each write is an UPDATE guarded in SQL by the transition's allowed `from` states, so two writers
racing (an agent's update and a user's stop, a scheduling pass and a lease expiry) cannot skip a
state or move a finished job again: the second one finds nothing to update. A refused transition
aimed at one job or run is logged with both states. A run's status is derived from its jobs
(`refresh_run_status`). Jobs and runs are created (INSERT) by the store in the state of their
creation transition here (`SUBMIT`, `UPLOAD`, `SUBMIT_RUN`, `UPLOAD_RUN`).

docs/lifecycle.md shows the table: `python -m dstack.coordinator.lifecycle --write` regenerates
that section (tests/unit/test_lifecycle.py fails when it is stale).
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dstack.coordinator.lifecycle import agents as agent_lifecycle
from dstack.coordinator.model import (
    ON_AGENT,
    TERMINAL_JOB,
    TERMINAL_RUN,
    WAITING,
    JobStatus,
    RunStatus,
    TerminationReason,
    termination_reason,
)

log = logging.getLogger("dstack.coordinator")
JS, RS, TR = JobStatus, RunStatus, TerminationReason


class Actor(enum.StrEnum):
    AGENT = "agent"  # reports from the job's agent
    USER = "user"  # a CLI request
    SCHEDULER = "scheduler"  # a scheduling pass
    SYSTEM = "system"  # the coordinator itself: lease expiry, dependency failure, reconciliation


@dataclass(frozen=True)
class JobTransition:
    name: str
    src: frozenset[JobStatus]  # empty: the job is created in `dst`
    dst: JobStatus
    actor: Actor
    reason: TerminationReason | None  # recorded on a final state; None: as the agent reports it
    cause: str


@dataclass(frozen=True)
class RunTransition:
    name: str
    src: frozenset[RunStatus]  # empty: the run is created in `dst`
    dst: RunStatus
    actor: Actor
    cause: str  # a run's termination reason and message are those of the job that decided it


def _job(
    name: str, src: Iterable[JobStatus], dst: JobStatus, actor: Actor, reason: TerminationReason | None, cause: str
) -> JobTransition:
    return JobTransition(name, frozenset(src), dst, actor, reason, cause)


_UP_TO_RUNNING = (JS.ASSIGNED, JS.PULLING)
SUBMIT = _job("submit", (), JS.SUBMITTED, Actor.USER, None, "`dstack run` stores the run's jobs")
UPLOAD = _job("upload", (), JS.UPLOADING, Actor.USER, None, "`dstack artifacts upload` creates a one-job run")
MARK_PENDING = _job(
    "mark-pending", (JS.SUBMITTED,), JS.PENDING, Actor.SCHEDULER, None, "a pass found it cannot start yet"
)
PLACE = _job("place", WAITING, JS.ASSIGNED, Actor.SCHEDULER, None, "a pass placed it on an agent (GPUs chosen)")
UNSCHEDULABLE = _job(
    "unschedulable", WAITING, JS.FAILED, Actor.SCHEDULER, TR.UNSCHEDULABLE, "local mode: no agent can ever fit it"
)
DEPENDENCY_FAILED = _job(
    "dependency-failed",
    WAITING,
    JS.FAILED,
    Actor.SYSTEM,
    TR.DEPENDENCY_FAILED,
    "a job it depends on failed or was stopped",
)
STOP_WAITING = _job(
    "stop-waiting", WAITING, JS.STOPPED, Actor.USER, TR.STOPPED_BY_USER, "`dstack stop` before it reached an agent"
)
STOP_UNSTARTED = _job(
    "stop-unstarted",
    (JS.ASSIGNED,),
    JS.STOPPED,
    Actor.USER,
    TR.STOPPED_BY_USER,
    "stopped while its agent was away; the agent came back without having started it",
)
AGENT_PULLING = _job("agent-pulling", (JS.ASSIGNED,), JS.PULLING, Actor.AGENT, None, "the agent pulls its image")
AGENT_RUNNING = _job("agent-running", _UP_TO_RUNNING, JS.RUNNING, Actor.AGENT, None, "the agent started it")
AGENT_UPLOADING = _job(
    "agent-uploading", (*_UP_TO_RUNNING, JS.RUNNING), JS.UPLOADING, Actor.AGENT, None, "its process ended"
)
AGENT_DONE = _job("agent-done", ON_AGENT, JS.DONE, Actor.AGENT, None, "exit code 0 and artifacts saved")
AGENT_FAILED = _job(
    "agent-failed", ON_AGENT, JS.FAILED, Actor.AGENT, None, "exit code, executor error or artifact upload failed"
)
AGENT_STOPPED = _job("agent-stopped", ON_AGENT, JS.STOPPED, Actor.AGENT, None, "the agent stopped it")
AGENT_STOPPED_ON_REQUEST = _job(
    "agent-stopped-on-request",
    ON_AGENT,
    JS.STOPPED,
    Actor.AGENT,
    TR.STOPPED_BY_USER,
    "the user asked to stop it and the agent reports it failed or stopped",
)
AGENT_LOST = _job("agent-lost", ON_AGENT, JS.FAILED, Actor.SYSTEM, TR.AGENT_LOST, "its agent's lease ran out")
AGENT_REMOVED = _job(
    "agent-removed",
    ON_AGENT,
    JS.FAILED,
    Actor.USER,
    TR.AGENT_LOST,
    "an admin removed its agent (`dstack agents remove`)",
)
LOST_BY_AGENT = _job(
    "lost-by-agent",
    ON_AGENT,
    JS.FAILED,
    Actor.SYSTEM,
    TR.EXECUTOR_ERROR,
    "its agent reconnected without it (the agent restarted)",
)
UNDELIVERABLE = _job(
    "undeliverable",
    (JS.ASSIGNED,),
    JS.FAILED,
    Actor.SCHEDULER,
    TR.EXECUTOR_ERROR,
    "its assignment could not be built (its stored spec or code is unreadable) or sent to its agent (aborted there)",
)
# Attempts (workflow `retry`, preemption; coordinator/lifecycle/attempts.py): the job goes back to
# waiting as a new attempt, its attempt number counted up; the attempt that ended is kept in
# job_attempts with its agent, times and reason.
REQUEUE_AGENT_LOST = _job(
    "requeue-agent-lost",
    ON_AGENT,
    JS.PENDING,
    Actor.SYSTEM,
    None,
    "its agent was lost (lease ran out, or it restarted without the job) and `retry.on` lists agent-lost",
)
REQUEUE_ERROR = _job(
    "requeue-error",
    ON_AGENT,
    JS.PENDING,
    Actor.AGENT,
    None,
    "it exited non-zero and `retry.on` lists error",
)
REQUEUE_DISK_FULL = _job(
    "requeue-disk-full",
    ON_AGENT,
    JS.PENDING,
    Actor.AGENT,
    None,
    "its agent's disk was full (ENOSPC preparing it, or it failed below the agent's --min-free-disk): requeued on"
    " another agent, up to 3 attempts (or `retry.limit`, if more)",
)
REQUEUE_PREEMPTED = _job(
    "requeue-preempted",
    ON_AGENT,
    JS.PENDING,
    Actor.AGENT,
    None,
    "preempted (interruptible): its agent stopped it and saved its artifacts; the next attempt starts with them",
)
AGENT_PREEMPTED = _job(
    "agent-preempted",
    ON_AGENT,
    JS.FAILED,
    Actor.AGENT,
    TR.PREEMPTED,
    "preempted, and `retry` (which lists preempted) allows no more attempts",
)
AGENT_MAX_DURATION = _job(
    "agent-max-duration",
    ON_AGENT,
    JS.FAILED,
    Actor.AGENT,
    TR.MAX_DURATION,
    "it ran longer than its `max_duration` and its agent stopped it",
)
# Multi-node gangs (docs/multinode.md; coordinator/store/gangs.py): the members share one fate.
GANG_FAILED = _job(
    "gang-failed",
    (*WAITING, *ON_AGENT),
    JS.FAILED,
    Actor.SYSTEM,
    TR.GANG_FAILED,
    "another node of its multi-node gang failed (or lost its agent) for good; its agent aborts it",
)
GANG_REQUEUE = _job(
    "gang-requeue",
    (JS.SUBMITTED, *ON_AGENT),
    JS.PENDING,
    Actor.SYSTEM,
    None,
    "another node of its multi-node gang was requeued as a new attempt (`retry`): the gang runs again as a whole",
)
CACHE_HIT = _job(
    "cache-hit",
    WAITING,
    JS.DONE,
    Actor.SCHEDULER,
    TR.DONE,
    "the step cache found a done job with its key: its artifacts are reused, nothing runs (coordinator/cache.py)",
)
UPLOAD_DONE = _job(
    "upload-done", (JS.UPLOADING,), JS.DONE, Actor.USER, TR.DONE, "`dstack artifacts upload` committed the files"
)

JOB_TRANSITIONS: tuple[JobTransition, ...] = (
    SUBMIT,
    UPLOAD,
    MARK_PENDING,
    PLACE,
    UNSCHEDULABLE,
    DEPENDENCY_FAILED,
    STOP_WAITING,
    STOP_UNSTARTED,
    AGENT_PULLING,
    AGENT_RUNNING,
    AGENT_UPLOADING,
    AGENT_DONE,
    AGENT_FAILED,
    AGENT_STOPPED,
    AGENT_STOPPED_ON_REQUEST,
    AGENT_LOST,
    AGENT_REMOVED,
    LOST_BY_AGENT,
    UNDELIVERABLE,
    REQUEUE_AGENT_LOST,
    REQUEUE_ERROR,
    REQUEUE_DISK_FULL,
    REQUEUE_PREEMPTED,
    AGENT_PREEMPTED,
    AGENT_MAX_DURATION,
    GANG_FAILED,
    GANG_REQUEUE,
    CACHE_HIT,
    UPLOAD_DONE,
)
_FROM_AGENT: dict[int, JobTransition] = {
    JS.PULLING: AGENT_PULLING,
    JS.RUNNING: AGENT_RUNNING,
    JS.UPLOADING: AGENT_UPLOADING,
    JS.DONE: AGENT_DONE,
    JS.FAILED: AGENT_FAILED,
    JS.STOPPED: AGENT_STOPPED,
}

ACTIVE_RUN = frozenset(RS) - TERMINAL_RUN
SUBMIT_RUN = RunTransition("submit", frozenset(), RS.SUBMITTED, Actor.USER, "`dstack run`")
UPLOAD_RUN = RunTransition("upload", frozenset(), RS.RUNNING, Actor.USER, "`dstack artifacts upload`")
_DERIVED_CAUSE = {
    RS.SUBMITTED: "its unfinished jobs are all submitted",
    RS.PENDING: "a job is pending and none is on an agent",
    RS.PULLING: "a job pulls its image and none runs yet",
    RS.RUNNING: "a job runs, or one is assigned and none pulls",
    RS.UPLOADING: "a job uploads and none is assigned, pulling or running",
    RS.DONE: "every job is done (sets the run's `-t` tag)",
    RS.FAILED: "every job finished and one failed (its reason and message)",
    RS.STOPPED: "every job finished, one was stopped and none failed",
}
DERIVED = {
    dst: RunTransition(f"derive-{dst.label}", ACTIVE_RUN - {dst}, dst, Actor.SYSTEM, cause)
    for dst, cause in _DERIVED_CAUSE.items()
}
RUN_TRANSITIONS: tuple[RunTransition, ...] = (SUBMIT_RUN, UPLOAD_RUN, *DERIVED.values())


def agent_transition(reported: int, stop_requested: bool) -> JobTransition | None:
    """What an agent's report asks for; None for a status agents never report."""
    if stop_requested and reported in (JS.FAILED, JS.STOPPED):
        return AGENT_STOPPED_ON_REQUEST
    return _FROM_AGENT.get(reported)


def _in(values: Iterable[int]) -> str:
    if isinstance(values, frozenset):  # a transition's states: built once each, not per statement
        return _in_set(values)
    return ",".join(str(int(v)) for v in sorted(values))


@functools.lru_cache(maxsize=256)
def _in_set(values: frozenset[int]) -> str:
    return ",".join(str(int(v)) for v in sorted(values))


def _refused(kind: str, ident: str, current: int, target: int, why: str) -> None:
    # A repeat (an agent resending what is already stored) is routine after a reconnect.
    level = logging.DEBUG if current == target else logging.INFO
    src, dst = _label(kind, current), _label(kind, target)
    log.log(level, "%s %s: refused transition %s -> %s (%s)", kind, ident, src, dst, why)


def _label(kind: str, value: int) -> str:
    try:
        return (JobStatus if kind == "job" else RunStatus)(value).label
    except ValueError:
        return f"status {value}"


@dataclass(frozen=True)
class Moved:
    job_id: str
    run_id: str


def move_jobs(
    c: sqlite3.Connection,
    t: JobTransition,
    where: str,
    params: dict[str, Any],
    *,
    reason: TerminationReason | None = None,
    message: str = "",
    at: int | None = None,
    also: str = "",
) -> list[Moved]:
    """Moves the jobs matched by `where` (named parameters) that are in one of `t`'s `from` states.

    A final state records the termination reason (the transition's own, else `reason`), `message`
    and `at` as finished_at. `also` sets more columns in the same statement (e.g. `agent_id = :agent`).
    """
    if not t.src:
        raise ValueError(f"transition {t.name} creates jobs: it is an INSERT, not a move")
    sets = ["status = :_dst"]
    values = {**params, "_dst": int(t.dst)}
    if t.dst in TERMINAL_JOB:
        recorded = t.reason if t.reason is not None else reason
        if recorded is None or at is None:
            raise ValueError(f"transition {t.name} ends the job: it needs a termination reason and a time")
        sets += ["termination_reason = :_reason", "message = :_message", "finished_at = :_at"]
        values.update(_reason=int(recorded), _message=message, _at=at)
    if also:
        sets.append(also)
    sql = f"UPDATE jobs SET {', '.join(sets)} WHERE ({where}) AND status IN ({_in(t.src)}) RETURNING id, run_id"
    return [Moved(r[0], r[1]) for r in c.execute(sql, values).fetchall()]


def move_jobs_each(
    c: sqlite3.Connection,
    t: JobTransition,
    where: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    also: str,
) -> list[Moved]:
    """`move_jobs` for many jobs that each get values of their own, one UPDATE per BATCH rows instead of one
    per job: each row is (job id, termination reason, message, finished at, *the values of `columns`), the
    three after the id recorded as `move_jobs` records a final state's (pass the transition's own reason
    where it has one). `where` and `also` name the values as `v.<column>`, the job's own columns plainly."""
    if not t.src or t.dst not in TERMINAL_JOB:
        raise ValueError(f"transition {t.name}: move_jobs_each moves jobs to a final state")
    names = ", ".join(["_id", "_reason", "_message", "_at", *columns])
    width = 4 + len(columns)
    out: list[Moved] = []
    for i in range(0, len(rows), BATCH):
        chunk = rows[i : i + BATCH]
        values = ", ".join([f"({', '.join('?' * width)})"] * len(chunk))
        sql = (
            f"WITH v({names}) AS (VALUES {values}) UPDATE jobs SET status = {int(t.dst)},"
            f" termination_reason = v._reason, message = v._message, finished_at = v._at, {also}"
            f" FROM v WHERE jobs.id = v._id AND ({where}) AND jobs.status IN ({_in(t.src)}) RETURNING id, run_id"
        )
        out += [Moved(r[0], r[1]) for r in c.execute(sql, [x for row in chunk for x in row]).fetchall()]
    return out


def move_job(
    c: sqlite3.Connection,
    t: JobTransition,
    job_id: str,
    *,
    reason: TerminationReason | None = None,
    message: str = "",
    at: int | None = None,
    also: str = "",
    params: dict[str, Any] | None = None,
) -> Moved | None:
    """One job; a refusal (it is in a state `t` does not leave from) is logged with both states."""
    moved = move_jobs(
        c, t, "id = :_id", {**(params or {}), "_id": job_id}, reason=reason, message=message, at=at, also=also
    )
    if moved:
        return moved[0]
    row = c.execute("SELECT status FROM jobs WHERE id = ?", [job_id]).fetchone()
    if row is not None:
        refuse_job(job_id, row[0], int(t.dst), f"{t.name}, by {t.actor}")
    return None


# Rows per batched statement: 4 values each stays well under SQLite's 32,766 variables.
BATCH = 500


def move_each(c: sqlite3.Connection, t: JobTransition, job_ids: Sequence[str]) -> list[Moved]:
    """`move_job` for many jobs (a transition that sets nothing else), one UPDATE per BATCH: a pass
    marks thousands pending at once. Refusals are logged as `move_job` logs them."""
    out: list[Moved] = []
    for i in range(0, len(job_ids), BATCH):
        chunk = list(job_ids[i : i + BATCH])
        params = {f"_j{k}": job_id for k, job_id in enumerate(chunk)}
        moved = move_jobs(c, t, f"id IN ({', '.join(':' + k for k in params)})", params)
        out += moved
        _log_refused(c, t, chunk, {m.job_id for m in moved})
    return out


def place_jobs(c: sqlite3.Connection, placements: Sequence[tuple[str, str, list[int], str]]) -> list[Moved]:
    """PLACE for a whole pass: (job id, agent id, GPU indices, gang master) each, one UPDATE per BATCH
    (the per-job statement cost a pass placing thousands as many round trips). Only jobs still waiting
    move, as with `move_job`; the others (stopped meanwhile) are logged as refused and left out."""
    t = PLACE
    out: list[Moved] = []
    for i in range(0, len(placements), BATCH):
        chunk = placements[i : i + BATCH]
        values = ", ".join("(?, ?, ?, ?)" for _ in chunk)
        params: list[object] = []
        for job_id, agent_id, gpus, master in chunk:
            params += [job_id, agent_id, json.dumps(gpus), master]
        rows = c.execute(
            f"WITH v(id, agent, gpus, master) AS (VALUES {values})"
            f" UPDATE jobs SET status = {int(t.dst)}, agent_id = v.agent, gpu_indices = v.gpus, message = '',"
            f" master = v.master FROM v WHERE jobs.id = v.id AND jobs.status IN ({_in(t.src)}) RETURNING id, run_id",
            params,
        ).fetchall()
        moved = [Moved(r[0], r[1]) for r in rows]
        out += moved
        _log_refused(c, t, [p[0] for p in chunk], {m.job_id for m in moved})
    return out


def _log_refused(c: sqlite3.Connection, t: JobTransition, job_ids: Sequence[str], moved: set[str]) -> None:
    left = [j for j in job_ids if j not in moved]
    if not left:
        return
    rows = c.execute(f"SELECT id, status FROM jobs WHERE id IN ({', '.join('?' * len(left))})", left)
    for job_id, status in rows:
        refuse_job(job_id, status, int(t.dst), f"{t.name}, by {t.actor}")


def refuse_job(job_id: str, current: int, target: int, why: str) -> None:
    _refused("job", job_id, current, target, why)


def fail_dependants(c: sqlite3.Connection, run_id: str, now: int) -> None:
    """Jobs waiting on a job that did not finish done can never start (transitively)."""
    while True:
        rows = c.execute("SELECT id, job_name, status, depends_on FROM jobs WHERE run_id = ?", [run_id]).fetchall()
        bad = {r[1] for r in rows if r[2] in (JS.FAILED, JS.STOPPED)}
        victims = [
            (r[0], next(d for d in json.loads(r[3]) if d in bad))
            for r in rows
            if r[2] in WAITING and bad.intersection(json.loads(r[3]))
        ]
        if not victims:
            return
        for job_id, dep in victims:
            move_job(c, DEPENDENCY_FAILED, job_id, message=f"dependency {dep!r} failed", at=now)


def derive_run_status(jobs: list[tuple[int, int, str, str]]) -> tuple[RunStatus, TerminationReason, str]:
    """A run's status from its jobs' (status, termination reason, message, job name), in the order
    they finished; with the termination reason and message it records (docs/lifecycle.md)."""
    s = {st for st, _, _, _ in jobs}
    if s <= TERMINAL_JOB:
        failed = [x for x in jobs if x[0] == JS.FAILED]
        stopped = [x for x in jobs if x[0] == JS.STOPPED]
        if failed:
            message = f"{failed[0][3]}: {failed[0][2]}" if len(jobs) > 1 else failed[0][2]
            return RS.FAILED, termination_reason(failed[0][1]), message
        if stopped:
            return RS.STOPPED, termination_reason(stopped[0][1]), stopped[0][2]
        return RS.DONE, TR.DONE, ""
    if JS.PULLING in s and JS.RUNNING not in s:
        status = RS.PULLING
    elif JS.RUNNING in s or JS.ASSIGNED in s:
        status = RS.RUNNING
    elif JS.UPLOADING in s:
        status = RS.UPLOADING
    elif JS.PENDING in s:
        status = RS.PENDING
    else:
        status = RS.SUBMITTED
    return status, TR.UNSPECIFIED, ""


def refresh_run_status(c: sqlite3.Connection, run_id: str, now: int) -> RunStatus | None:
    """Derives a run's status from its jobs and moves the run there; returns the new status if it
    changed. A run that finishes done gets its `dstack run -t TAG` tag in its repository (moved if it existed)."""
    found = c.execute(
        "SELECT status, termination_reason, message, job_name, (SELECT status FROM runs WHERE id = :id)"
        " FROM jobs WHERE run_id = :id ORDER BY finished_at",
        {"id": run_id},
    ).fetchall()
    jobs = [(r[0], r[1], r[2] or "", r[3]) for r in found]
    status, reason, message = derive_run_status(jobs)
    t = DERIVED[status]
    if found and found[0][4] == status and status not in t.src:
        # Already there, and not a transition that rewrites its own state: the UPDATE below would match no
        # row and be followed by a read of the status, which is this one (most job changes leave the run's
        # status as it was: two statements per job saved).
        return None
    row = c.execute(
        "UPDATE runs SET status = :s, termination_reason = :r, message = :m, finished_at = COALESCE(finished_at, :f)"
        f" WHERE id = :id AND status IN ({_in(t.src)}) RETURNING tag_on_done, repository",
        {"s": int(status), "r": int(reason), "m": message, "f": now if status in TERMINAL_RUN else None, "id": run_id},
    ).fetchone()
    if row is None:
        current = c.execute("SELECT status FROM runs WHERE id = ?", [run_id]).fetchone()
        if current is not None and current[0] != status:  # the same status is no transition at all
            _refused("run", run_id, current[0], int(status), f"{t.name}, by {t.actor}")
        return None
    if row[0] and status == RS.DONE:
        c.execute(
            "INSERT INTO tags (repository, name, run_id, created_at) VALUES (?, ?, ?, ?) ON CONFLICT(repository, name)"
            " DO UPDATE SET run_id = excluded.run_id, created_at = excluded.created_at",
            [row[1], row[0], run_id, now],
        )
    return status


def refresh_run_statuses(c: sqlite3.Connection, run_ids: Iterable[str], now: int) -> None:
    """`refresh_run_status` for many runs (a pass's placements, and a batch of agents' reports, touch one run
    each for single-job runs): their jobs and current statuses read in one query each per BATCH, and the
    runs that move to the same status with the same reason and message moved by one UPDATE (a run that
    finishes gets its finish time, and its tag if it finished done, as there); one already in the derived
    status is no transition, as there."""
    ids = sorted(set(run_ids))
    for i in range(0, len(ids), BATCH):
        chunk = ids[i : i + BATCH]
        marks = ", ".join("?" * len(chunk))
        jobs: dict[str, list[tuple[int, int, str, str]]] = {run_id: [] for run_id in chunk}
        for r in c.execute(
            "SELECT run_id, status, termination_reason, message, job_name FROM jobs"
            f" WHERE run_id IN ({marks}) ORDER BY finished_at",
            chunk,
        ):
            jobs[r[0]].append((r[1], r[2], r[3] or "", r[4]))
        current = dict(c.execute(f"SELECT id, status FROM runs WHERE id IN ({marks})", chunk).fetchall())
        to: dict[tuple[RunStatus, TerminationReason, str], list[str]] = {}
        for run_id, its_jobs in jobs.items():
            if run_id not in current:
                continue
            derived = derive_run_status(its_jobs)
            if current[run_id] != derived[0]:
                to.setdefault(derived, []).append(run_id)
        for (status, reason, message), movers in to.items():
            t = DERIVED[status]
            moved = {
                r[0]: (r[1], r[2])
                for r in c.execute(
                    "UPDATE runs SET status = ?, termination_reason = ?, message = ?,"
                    f" finished_at = COALESCE(finished_at, ?) WHERE id IN ({', '.join('?' * len(movers))})"
                    f" AND status IN ({_in(t.src)}) RETURNING id, tag_on_done, repository",
                    [int(status), int(reason), message, now if status in TERMINAL_RUN else None, *movers],
                )
            }
            for run_id in movers:
                if run_id not in moved:  # finished meanwhile: no state leaves a final one
                    _refused("run", run_id, current[run_id], int(status), f"{t.name}, by {t.actor}")
                elif status == RS.DONE and (tag := moved[run_id])[0]:
                    c.execute(
                        "INSERT INTO tags (repository, name, run_id, created_at) VALUES (?, ?, ?, ?)"
                        " ON CONFLICT(repository, name) DO UPDATE SET run_id = excluded.run_id,"
                        " created_at = excluded.created_at",
                        [tag[1], tag[0], run_id, now],
                    )


# ---- docs/lifecycle.md -------------------------------------------------------------------------
BEGIN = "<!-- BEGIN transitions: generated by `python -m dstack.coordinator.lifecycle --write` -->"
END = "<!-- END transitions -->"
DOC = Path(__file__).resolve().parents[2] / "docs" / "lifecycle.md"  # in a source checkout


# The order states are listed in: the order a job or run goes through them.
_JOB_ORDER = [JS.SUBMITTED, JS.PENDING, JS.ASSIGNED, JS.PULLING, JS.RUNNING, JS.UPLOADING, *sorted(TERMINAL_JOB)]
_RUN_ORDER = [RS.SUBMITTED, RS.PENDING, RS.PULLING, RS.RUNNING, RS.UPLOADING, *sorted(TERMINAL_RUN)]


def _states(states: frozenset[Any], order: list[Any]) -> str:
    if not states:
        return "(created)"
    return ", ".join(f"`{s.label}`" for s in sorted(states, key=order.index))


def markdown() -> str:
    """The generated section of docs/lifecycle.md, markers included."""
    out = [BEGIN, "", "Job transitions (`dstack.coordinator.lifecycle`, the only code that writes a status):", ""]
    out += ["| name | from | to | who | reason recorded | when |", "| --- | --- | --- | --- | --- | --- |"]
    for j in JOB_TRANSITIONS:
        reason = j.reason.label if j.reason else ("as the agent reports" if j.dst in TERMINAL_JOB else "")
        src = _states(j.src, _JOB_ORDER)
        out.append(f"| {j.name} | {src} | `{j.dst.label}` | {j.actor} | {reason} | {j.cause} |")
    out += ["", "Run transitions (derived from the jobs on every job change):", ""]
    out += ["| name | from | to | who | when |", "| --- | --- | --- | --- | --- |"]
    for r in RUN_TRANSITIONS:
        src = _states(r.src, _RUN_ORDER)
        if r.src and r.src == ACTIVE_RUN - {r.dst}:
            src = "any unfinished" if r.dst in TERMINAL_RUN else "any other unfinished"
        out.append(f"| {r.name} | {src} | `{r.dst.label}` | {r.actor} | {r.cause} |")
    out += ["", "Final states (`done`, `failed`, `stopped`) have no exits.", ""]
    out += [*agent_lifecycle.markdown_lines(), "", END]
    return "\n".join(out)


def with_section(doc: str) -> str:
    """`doc` with its generated section replaced by the current one."""
    head, sep, rest = doc.partition(BEGIN)
    if not sep or END not in rest:
        raise ValueError(f"docs/lifecycle.md lacks the markers {BEGIN!r} ... {END!r}")
    return head + markdown() + rest.partition(END)[2]
