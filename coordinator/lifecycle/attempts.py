"""Ending an attempt of a job: the job ends with it, or goes back to waiting as a new attempt.

Which causes requeue is the workflow's `retry: {limit: N, on: [agent-lost, preempted, error]}`;
preemption (the coordinator's own decision, only for `interruptible` jobs) requeues also without a
`retry` field, and counts against the limit only when `retry.on` lists `preempted`. The attempt that
ended is recorded in `job_attempts` (agent, start, end, status, reason); the job's row is reset for
the next one (no agent, no GPUs, attempt + 1) and remembers the agent to avoid.
"""

from __future__ import annotations

import posixpath
import sqlite3
from typing import Any

from dstack.coordinator import lifecycle
from dstack.coordinator.model import ArtifactFile, ArtifactInput, JobStatus, TerminationReason
from dstack.coordinator.store.base import rows
from dstack.protos.v1 import common_pb2

AGENT_LOST, PREEMPTED, ERROR = "agent-lost", "preempted", "error"
# The agent's disk was full (agent/diskspace.py): the coordinator's own cause, not one `retry.on` lists.
# Infrastructure, not the job, so it is requeued without `retry` too, like preemption; but a job that
# fills every disk it gets must end, so only up to attempt DISK_FULL_ATTEMPTS (or `retry.limit`, if more).
DISK_FULL = "disk-full"
DISK_FULL_ATTEMPTS = 3


def retry_allows(spec: bytes, attempt: int, cause: str) -> bool:
    """Whether the attempt `attempt` that ended for `cause` is followed by a new one."""
    s = common_pb2.JobSpec.FromString(spec)
    if cause == DISK_FULL:
        return attempt < max(DISK_FULL_ATTEMPTS, s.retry.limit + 1 if s.HasField("retry") else 0)
    listed = s.HasField("retry") and cause in s.retry.on
    if cause == PREEMPTED and not listed:
        return True
    return listed and attempt <= s.retry.limit


def limit_note(spec: bytes, attempt: int, cause: str) -> str:
    """Said of a job that ends although `retry` lists its cause: the limit was reached."""
    s = common_pb2.JobSpec.FromString(spec)
    if cause == DISK_FULL:
        return f" (attempt {attempt}; no more attempts after a full disk)"
    if s.HasField("retry") and cause in s.retry.on:
        return f" (attempt {attempt}; retry limit {s.retry.limit} reached)"
    return ""


def end_attempt(
    c: sqlite3.Connection,
    job_id: str,
    cause: str,
    final: lifecycle.JobTransition,
    requeue: lifecycle.JobTransition,
    *,
    reason: TerminationReason,
    message: str,
    now: int,
    also: str = "",
    params: dict[str, Any] | None = None,
) -> tuple[lifecycle.Moved | None, bool]:
    """Ends the job's current attempt for `cause`: a new attempt (`requeue`) if its `retry` allows,
    else the job ends (`final`, the limit noted in its message). Returns (moved, requeued)."""
    row = c.execute("SELECT spec, attempt, agent_id, started_at, status FROM jobs WHERE id = ?", [job_id]).fetchone()
    if row is None:
        return None, False
    spec, attempt, agent_id, started_at, status = row
    if status in requeue.src and retry_allows(spec, attempt, cause):
        moved = lifecycle.move_job(
            c,
            requeue,
            job_id,
            also="attempt = attempt + 1, agent_id = NULL, gpu_indices = '[]', ports = '[]', started_at = NULL,"
            " exit_code = NULL, stop_requested = 0, stop_reason = 0, stop_message = '', deadline_at = 0,"
            " avoid_agent = :_avoid,"
            " termination_reason = 0, message = :_msg",  # the ended attempt's reason is in job_attempts
            params={"_avoid": agent_id or "", "_msg": f"attempt {attempt}: {message}"},
        )
        if moved is not None:
            attempt_status = JobStatus.STOPPED if cause == PREEMPTED else JobStatus.FAILED
            c.execute(
                "INSERT OR REPLACE INTO job_attempts (job_id, attempt, agent_id, status, termination_reason, message,"
                " started_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [job_id, attempt, agent_id or "", int(attempt_status), int(reason), message, started_at or 0, now],
            )
        return moved, moved is not None
    moved = lifecycle.move_job(
        c,
        final,
        job_id,
        reason=reason,
        message=message + limit_note(spec, attempt, cause),
        at=now,
        also=also,
        params=params,
    )
    return moved, False


def resume_inputs(c: sqlite3.Connection, job_id: str) -> list[ArtifactInput]:
    """What a later attempt starts with besides its dependencies: the files its earlier attempts
    saved in its `mount: true` folders (a checkpoint to resume from)."""
    spec, attempt, job_name = c.execute("SELECT spec, attempt, job_name FROM jobs WHERE id = ?", [job_id]).fetchone()
    if attempt <= 1:
        return []
    s = common_pb2.JobSpec.FromString(spec)
    # Recorded paths are relative to the job's folder, artifact paths to its working directory.
    mounts = [posixpath.normpath(posixpath.join(s.working_dir or ".", a.path)) for a in s.artifacts if a.mount]
    if not mounts:
        return []
    found = rows(
        c,
        "SELECT r.name AS run_name, a.path, a.size, a.sha256 FROM jobs j JOIN runs r ON r.id = j.run_id"
        " JOIN artifacts a ON a.job_id = j.id WHERE j.id = ? ORDER BY a.path",
        [job_id],
    )
    files = [
        ArtifactFile(job_name, r["path"], r["size"], r["sha256"])
        for r in found
        if any(m == "." or r["path"] == m or r["path"].startswith(m + "/") for m in mounts)
    ]
    # An absolute `mount: true` folder (inside the container) comes back at the same path.
    roots = tuple(m for m in mounts if m.startswith("/"))
    return [ArtifactInput(found[0]["run_name"], job_name, files, roots)] if files else []
