"""The gang sweep: the members of a multi-node gang share one fate (docs/multinode.md).

Whatever ended a member (its exit code, its agent's lease, an agent restart or removal, preemption,
max_duration) went through its own path and ended or requeued that member alone. The sweep then
settles each gang that still has members waiting or on agents, in one transaction:

- a member's attempt was requeued (its `retry` allowed it): every member of an older attempt is
  requeued with it, to the same attempt number (aborted on its agent if it was there); but if one of
  them had already ended (done, or failed for good: a final state has no way back), a new attempt
  could never have all its nodes, and the gang fails instead;
- a member failed for good: every member still waiting or on an agent fails with GANG_FAILED and a
  message naming that node, and is aborted on its agent.

A member that finished done meanwhile waits (done) for the others; the run is done when all are. A
run stopped by its user stops all members on its own, so a STOPPED member triggers nothing here.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

from dstack.coordinator import lifecycle
from dstack.coordinator.attempts import wire_job_id
from dstack.coordinator.model import ON_AGENT, WAITING, JobStatus, TerminationReason
from dstack.coordinator.store.base import ints_in


@dataclass
class GangSettlement:
    stops: list[tuple[str, str]] = field(default_factory=list)  # (wire job id, agent id) to abort
    requeued: list[str] = field(default_factory=list)  # job ids back to waiting as a new attempt
    runs: set[str] = field(default_factory=set)  # runs whose jobs changed


@dataclass(frozen=True)
class _Member:
    id: str
    run_id: str
    gang: str
    node_rank: int
    status: JobStatus
    attempt: int
    agent_id: str
    agent_name: str
    message: str
    started_at: int


def settle(c: sqlite3.Connection, now: int) -> GangSettlement:
    """Settles every gang with a member waiting or on an agent (see the module's docstring)."""
    out = GangSettlement()
    live = ints_in(WAITING | ON_AGENT)
    rows = c.execute(
        "SELECT j.id, j.run_id, j.gang, j.node_rank, j.status, j.attempt, j.agent_id, a.name, j.message,"
        " j.started_at FROM jobs j LEFT JOIN agents a ON a.id = j.agent_id"
        # INDEXED BY: left to itself SQLite reads every waiting and running job through jobs(status) (the
        # whole queue, on every job that ends) instead of the partial index of gang members.
        " WHERE j.gang != '' AND j.run_id IN"
        f" (SELECT run_id FROM jobs INDEXED BY jobs_gang WHERE gang != '' AND status IN ({live}))"
        " ORDER BY j.run_id, j.gang, j.node_rank"
    ).fetchall()
    gangs: dict[tuple[str, str], list[_Member]] = {}
    for r in rows:
        m = _Member(r[0], r[1], r[2], r[3], JobStatus(r[4]), r[5], r[6] or "", r[7] or "", r[8] or "", r[9] or 0)
        gangs.setdefault((m.run_id, m.gang), []).append(m)
    for members in gangs.values():
        if any(m.status in WAITING or m.status in ON_AGENT for m in members):
            _settle_gang(c, members, now, out)
    for run_id in out.runs:
        lifecycle.fail_dependants(c, run_id, now)
        lifecycle.refresh_run_status(c, run_id, now)
    return out


def _settle_gang(c: sqlite3.Connection, members: list[_Member], now: int, out: GangSettlement) -> None:
    latest = max(m.attempt for m in members)
    behind = [m for m in members if m.attempt < latest]
    if behind:
        ended = [m for m in behind if m.status not in WAITING and m.status not in ON_AGENT]
        if not ended:
            ahead = next(m for m in members if m.attempt == latest)
            why = f"node {ahead.node_rank}'s attempt {latest - 1} ended; the gang runs again as a whole"
            for m in behind:
                _requeue(c, m, latest, why, now, out)
            return
        # A member of the older attempt already ended (done, or failed for good before this sweep
        # saw the retried one): a new attempt could not have all its nodes, so the gang fails.
        e = ended[0]
        how = e.status.label + (f": {e.message}" if e.message else "")
        _fail_live(
            c, members, f"node {e.node_rank} already ended ({how}); the gang cannot run again as a whole", now, out
        )
        return
    failed = [m for m in members if m.status == JobStatus.FAILED]
    if not failed:
        return
    first = failed[0]
    where = f" on {first.agent_name}" if first.agent_name else ""
    _fail_live(c, members, f"node {first.node_rank}{where} failed: {first.message or 'no reason given'}", now, out)


def _fail_live(c: sqlite3.Connection, members: list[_Member], message: str, now: int, out: GangSettlement) -> None:
    """Every member still waiting or on an agent fails with the gang (aborted on its agent)."""
    for m in members:
        if m.status in WAITING or m.status in ON_AGENT:
            moved = lifecycle.move_job(c, lifecycle.GANG_FAILED, m.id, message=message, at=now)
            if moved is None:
                continue
            out.runs.add(m.run_id)
            if m.status in ON_AGENT and m.agent_id:
                out.stops.append((wire_job_id(m.id, m.attempt), m.agent_id))


def _requeue(c: sqlite3.Connection, m: _Member, attempt: int, why: str, now: int, out: GangSettlement) -> None:
    """The member joins the gang's newer attempt; the attempt it leaves is kept in job_attempts."""
    if m.status == JobStatus.PENDING:  # waiting already: only its attempt number catches up
        c.execute("UPDATE jobs SET attempt = ? WHERE id = ? AND status = ?", [attempt, m.id, int(JobStatus.PENDING)])
        out.runs.add(m.run_id)
        return
    moved = lifecycle.move_job(
        c,
        lifecycle.GANG_REQUEUE,
        m.id,
        also="attempt = :_attempt, agent_id = NULL, gpu_indices = '[]', started_at = NULL, exit_code = NULL,"
        " stop_requested = 0, stop_reason = 0, stop_message = '', deadline_at = 0, avoid_agent = '',"
        " termination_reason = 0, master = '', message = :_msg",
        params={"_attempt": attempt, "_msg": f"attempt {m.attempt}: {why}"},
    )
    if moved is None:
        return
    out.runs.add(m.run_id)
    out.requeued.append(m.id)
    if m.status in ON_AGENT and m.agent_id:
        out.stops.append((wire_job_id(m.id, m.attempt), m.agent_id))
    c.execute(
        "INSERT OR REPLACE INTO job_attempts (job_id, attempt, agent_id, status, termination_reason, message,"
        " started_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            m.id,
            m.attempt,
            m.agent_id,
            int(JobStatus.FAILED),
            int(TerminationReason.GANG_FAILED),
            why,
            m.started_at,
            now,
        ],
    )
