"""How runs, jobs and times are shown."""

from __future__ import annotations

import time
from typing import cast

from dstack.protos.v1 import client_pb2, common_pb2


def run_status(status: int) -> str:
    # protobuf stubs want the enum's ValueType; an int from the wire is what we hold
    status = cast(common_pb2.RunStatus.ValueType, status)
    return common_pb2.RunStatus.Name(status).removeprefix("RUN_STATUS_").lower()


def job_status(status: int) -> str:
    status = cast(common_pb2.JobStatus.ValueType, status)
    return common_pb2.JobStatus.Name(status).removeprefix("JOB_STATUS_").lower()


def reason(value: int) -> str:
    if not value:
        return ""
    value = cast(common_pb2.TerminationReason.ValueType, value)
    return common_pb2.TerminationReason.Name(value).removeprefix("TERMINATION_REASON_").lower().replace("_", " ")


def ago(ns: int, now: float | None = None) -> str:
    if not ns:
        return ""
    delta = (now or time.time()) - ns / 1e9
    if delta < 60:
        return f"{max(0, int(delta))} sec ago"
    if delta < 3600:
        return f"{int(delta // 60)} min ago"
    if delta < 86400:
        return f"{int(delta // 3600)} hours ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ns / 1e9))


def iso(ns: int) -> str | None:
    if not ns:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns / 1e9)) + f".{ns % 1_000_000_000 // 1_000_000:03d}Z"


def plural(n: int, word: str) -> str:
    """`1 file`, `2 files`."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def waiting_text(status: str, message: str) -> str:
    """A run's state and the reason it is in it: `dstack ps`'s STATUS and MESSAGE columns on one line."""
    return f"{status}: {message}" if message else status


def eta(ns: int, now: float | None = None) -> str:
    """An expected start: `in 4 min`, `now`, or `unknown`."""
    if not ns:
        return "unknown"
    delta = ns / 1e9 - (now or time.time())
    if delta < 1:
        return "now"
    if delta < 90:
        return f"in {int(delta)} sec"
    if delta < 5400:
        return f"in {round(delta / 60)} min"
    if delta < 86400 * 2:
        return f"in {delta / 3600:.1f} hours"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ns / 1e9))


def queue_text(run: client_pb2.Run) -> str:
    """`#3 (starts in 4 min)` for a run's first waiting job in the scheduler's order ("" when none is
    in the order); the reason is the run's message (`waiting: ...`, `quota: ...`, `fair share: ...`)."""
    placed = [j for j in run.jobs if j.queue_position]
    if not placed:
        return ""
    j = min(placed, key=lambda j: j.queue_position)
    return f"#{j.queue_position} (starts {eta(j.eta_ns)})"


def run_summary(run: client_pb2.Run) -> str:
    """One line for the end of `dstack run`: the status and, if it did not finish done, why."""
    text = f"run {run.name} {run_status(run.status)}"
    if run.message:
        text += f": {run.message}"
    return text


def attempts(run: client_pb2.Run) -> int:
    """The highest attempt number of the run's jobs (1: none was retried or preempted)."""
    return max((j.attempt or 1 for j in run.jobs), default=1)


def preempted_text(run: client_pb2.Run) -> str:
    """Why the run's latest preempted attempt was preempted (`attempt 1 preempted for alice's job
    train-3/main (fair share)`), "" when none was."""
    latest: tuple[int, str] | None = None
    for j in run.jobs:
        for a in j.attempts:
            if a.termination_reason == common_pb2.TERMINATION_REASON_PREEMPTED and (
                latest is None or a.finished_at_ns >= latest[0]
            ):
                latest = (a.finished_at_ns, f"attempt {a.attempt} {a.message or 'preempted'}")
    return latest[1] if latest else ""


def reused_text(run: client_pb2.Run) -> str:
    """`download reused from bold-owl-3` for the run's jobs the step cache completed (docs/reproducibility.md)."""
    return ", ".join(
        f"{j.job_name} {j.message}"
        for j in run.jobs
        if j.status == common_pb2.JOB_STATUS_DONE and j.message.startswith("reused from ")
    )


def ports_text(run: client_pb2.Run) -> str:
    """`ports 8080, 41236->80` for a run's running jobs (HOST, or HOST->CONTAINER inside a container)."""
    texts = [
        str(p.host_port) if p.host_port == p.container_port else f"{p.host_port}->{p.container_port}"
        for j in run.jobs
        if j.status == common_pb2.JOB_STATUS_RUNNING
        for p in j.ports
    ]
    return f"ports {', '.join(texts)}" if texts else ""


def run_to_json(run: client_pb2.Run) -> dict[str, object]:
    return {
        "name": run.name,
        "workflow": run.workflow,
        "repository": run.repository,
        "owner": run.owner,
        "status": run_status(run.status),
        "termination_reason": reason(run.termination_reason) or None,
        "message": run.message or None,
        "submitted_at": iso(run.submitted_at_ns),
        "finished_at": iso(run.finished_at_ns),
        "tags": list(run.tags),
        "code": {
            "hash": run.code.hash,
            "commit": run.code.commit or None,
            "branch": run.code.branch or None,
            "repo_url": run.code.repo_url or None,
            "dirty": run.code.dirty,
        },
        "jobs": [
            {
                "id": j.id,
                "name": j.job_name,
                "status": job_status(j.status),
                "termination_reason": reason(j.termination_reason) or None,
                "message": j.message or None,
                "agent": j.agent_name or None,
                "gpus": list(j.gpu_indices),
                "exit_code": j.exit_code if j.has_exit_code else None,
                # What `ports:` (a list, or N picked at start) resolved to on the job's agent.
                "ports": [{"container": p.container_port, "host": p.host_port} for p in j.ports],
                # While waiting: the position in the scheduler's order, why, and the expected start.
                "queue_position": j.queue_position or None,
                "wait_reason": j.wait_reason or None,
                "eta": iso(j.eta_ns),
                "attempt": j.attempt or 1,
                "attempts": [
                    {
                        "attempt": a.attempt,
                        "agent": a.agent_name or None,
                        "status": job_status(a.status),
                        "termination_reason": reason(a.termination_reason) or None,
                        "message": a.message or None,
                        "started_at": iso(a.started_at_ns),
                        "finished_at": iso(a.finished_at_ns),
                    }
                    for a in j.attempts
                ],
            }
            for j in run.jobs
        ],
    }
