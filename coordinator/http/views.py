"""Domain values (coordinator/model.py, coordinator/app/) as JSON objects. Times stay in nanoseconds
since the epoch, as in the gRPC API (`*_ns`); statuses are lower-case names, as `dstack ps --json`."""

from __future__ import annotations

import dataclasses
from typing import Any

from dstack.coordinator import stored
from dstack.coordinator.app.waiting import QueueEntry
from dstack.coordinator.convert import job_spec_from_proto
from dstack.coordinator.model import AgentView, JobView, LogLine, LogStream, RunView

Json = dict[str, Any]


def _name(value: Any) -> str:
    return str(value.name).lower()


def job_json(j: JobView) -> Json:
    proto = stored.job_spec(j.id, j.spec) if j.spec else None
    message = j.message if proto is not None or not j.spec else stored.with_marker(j.message, stored.SPEC_DAMAGED)
    spec = job_spec_from_proto(proto) if proto is not None else None
    return {
        "id": j.id,
        "job_name": j.job_name,
        "status": _name(j.status),
        "termination_reason": _name(j.termination_reason),
        "message": message,
        "agent_name": j.agent_name,
        "gpu_indices": list(j.gpu_indices),
        "exit_code": j.exit_code,
        "submitted_at_ns": j.submitted_at_ns,
        "started_at_ns": j.started_at_ns,
        "finished_at_ns": j.finished_at_ns,
        "queue_position": j.queue_position,
        "wait_reason": j.wait_reason,
        "eta_ns": j.eta_ns,
        "attempt": j.attempt,
        "resources": dataclasses.asdict(spec.resources) if spec else None,
        "depends_on": list(spec.depends_on) if spec else [],
        # The workflow's variables (its `env` and 2022 `variables`) from the stored spec, which gRPC's
        # GetRun already returns whole to any user. Secrets are not among them: the agent adds those.
        "variables": dict(sorted(proto.env.items())) if proto is not None else {},
        "attempts": [
            {
                "attempt": a.attempt,
                "agent_name": a.agent_name,
                "status": _name(a.status),
                "termination_reason": _name(a.termination_reason),
                "message": a.message,
                "started_at_ns": a.started_at_ns,
                "finished_at_ns": a.finished_at_ns,
            }
            for a in j.attempts
        ],
    }


def run_json(r: RunView, with_jobs: bool = True) -> Json:
    out: Json = {
        "name": r.name,
        "workflow": r.workflow,
        "owner": r.owner,
        "repository": r.repository,
        "status": _name(r.status),
        "termination_reason": _name(r.termination_reason),
        "message": r.message,
        "submitted_at_ns": r.submitted_at_ns,
        "finished_at_ns": r.finished_at_ns,
        "code": dataclasses.asdict(r.code),
        "tags": list(r.tags),
    }
    if with_jobs:
        out["jobs"] = [job_json(j) for j in r.jobs]
    return out


def agent_json(a: AgentView) -> Json:
    inv = a.inventory
    busy = set(a.busy_gpu_indices)
    return {
        "id": a.id,
        "name": a.name,
        "status": a.status,
        "running_jobs": a.running_jobs,
        "last_heartbeat_ns": a.last_heartbeat_ns,
        "hostname": inv.hostname,
        "runtime": inv.runtime,
        "cpu_count": inv.cpu_count,
        "memory_total_bytes": inv.memory_total_bytes,
        "memory_available_bytes": inv.memory_available_bytes,
        "disk_free_bytes": inv.disk_free_bytes,
        "min_free_disk_bytes": inv.min_free_disk_bytes,
        "work_dir": inv.work_dir,
        "draining": "disk full" if inv.disk_full else "",
        "max_jobs": inv.max_jobs,
        "gpus": [{**dataclasses.asdict(g), "busy": g.index in busy} for g in inv.gpus],
    }


def queue_json(e: QueueEntry) -> Json:
    return {**dataclasses.asdict(e), "status": _name(e.status)}


def line_json(job_name: str, ln: LogLine) -> Json:
    try:
        stream = LogStream(ln.stream).name.lower()
    except ValueError:
        stream = str(ln.stream)
    return {"job": job_name, "seq": ln.seq, "stream": stream, "time_ns": ln.time_ns, "text": ln.text}
