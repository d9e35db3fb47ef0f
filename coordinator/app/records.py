"""The run record (docs/reproducibility.md): one versioned JSON document per run, `dstack show`.

Composed when asked from what the coordinator keeps: the run and its jobs (specs as the provider made
them, statuses, times, exit codes), the parts written at submission (the resolved workflow) and by the
agents (each job's environment, bounded: coordinator/records.py), the inputs and artifacts by manifest
hash. `dstack rerun`, `dstack diff` and the step cache read this same document.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from dstack.coordinator import stored
from dstack.coordinator.app.core import Core
from dstack.coordinator.app.transfer import read_chunks
from dstack.coordinator.artifacts import code_key
from dstack.coordinator.cache import CACHE_PART, image_of
from dstack.coordinator.convert import job_spec_dict
from dstack.coordinator.errors import NotFound
from dstack.coordinator.model import ArtifactFile, JobView, RunView
from dstack.coordinator.records import RECORD_VERSION, manifest_hash
from dstack.coordinator.store.artifacts import inputs_of
from dstack.coordinator.store.records import RUN_PART


@dataclass(frozen=True)
class RecordWithCode:
    record: dict[str, Any]
    code_url: str = ""  # presigned GETs; "" when there is none or the store cannot presign
    diff_url: str = ""


def _ns_to_s(ns: int) -> float:
    return round(ns / 1e9, 3)


def _timings(job: JobView, env: dict[str, Any]) -> dict[str, Any]:
    phases: dict[str, int] = dict(env.get("phase_ns") or {})
    out: dict[str, Any] = {p: _ns_to_s(ns) for p, ns in phases.items()}
    # Queued: from submission until the agent began the job; the agent's setup phases before `running`
    # are its own, so they are taken off the time until it started running.
    if job.started_at_ns and job.submitted_at_ns:
        before = sum(phases.get(p, 0) for p in ("pulling", "code", "inputs", "setup"))
        out["queued"] = _ns_to_s(max(0, job.started_at_ns - job.submitted_at_ns - before))
    if job.finished_at_ns and job.submitted_at_ns:
        out["total"] = _ns_to_s(job.finished_at_ns - job.submitted_at_ns)
    return out


def _cache_record(
    job: JobView, asked: bool, parts: dict[tuple[str, str], dict[str, Any]], key: str
) -> dict[str, Any] | None:
    """How the step cache saw the job (coordinator/cache.py): its key, whether it was a hit and of what (`asked`:
    whether its spec asked for the cache); None for a job it never keyed (one that has not started, failed
    without a key, an upload)."""
    hit = parts.get((job.id, CACHE_PART))
    if hit is not None:
        return {**hit, "asked": asked}
    if not key:
        return None
    return {"key": key, "hit": False, "source_run": "", "source_job": "", "asked": asked, **image_of(job.spec)}


def _job_record(
    job: JobView,
    parts: dict[tuple[str, str], dict[str, Any]],
    inputs: list[dict[str, Any]],
    artifacts: list[ArtifactFile],
    cache_key: str = "",
) -> dict[str, Any]:
    env = parts.get((job.id, "environment"), {})
    files = [(a.path, a.size, a.sha256) for a in artifacts]
    spec = stored.job_spec(job.id, job.spec)
    return {
        "job_name": job.job_name,
        "status": job.status.name.lower(),
        "termination_reason": job.termination_reason.name.lower(),
        "message": job.message if spec is not None else stored.with_marker(job.message, stored.SPEC_DAMAGED),
        "exit_code": job.exit_code,
        "attempt": job.attempt,
        "agent": job.agent_name,
        "gpu_indices": list(job.gpu_indices),
        "submitted_at_ns": job.submitted_at_ns,
        "started_at_ns": job.started_at_ns,
        "finished_at_ns": job.finished_at_ns,
        "spec": job_spec_dict(spec) if spec is not None else None,
        "inputs": inputs,
        "environment": env or None,
        "timings_s": _timings(job, env),
        "cache": _cache_record(job, spec.cache, parts, cache_key) if spec is not None else None,
        "artifacts": {
            "manifest_hash": manifest_hash(files) if files else "",
            "files": [{"path": p, "size": s, "sha256": h} for p, s, h in files],
        },
    }


def _compose(core: Core, run: RunView) -> dict[str, Any]:
    """On the DB thread."""
    row = core.store.run_by_name(run.name)
    parts = core.store.records.of_run(row.id)
    keys = core.store.cache.keys_of_run(row.id)
    by_job: dict[str, list[ArtifactFile]] = {}
    for a in core.store.list_artifacts(row.id):
        by_job.setdefault(a.job_name, []).append(ArtifactFile(a.job_name, a.path, a.size, a.sha256))
    jobs = []
    for job in run.jobs:
        inputs = [
            {
                "run": i.run_name,
                "job": i.job_name,
                "manifest_hash": manifest_hash([(f.path, f.size, f.sha256) for f in i.files]),
                "files": len(i.files),
            }
            for i in inputs_of(core.store.conn, job.id)
        ]
        jobs.append(_job_record(job, parts, inputs, by_job.get(job.job_name, []), keys.get(job.id, "")))
    submission = parts.get((RUN_PART, "submission"), {})
    code = asdict(run.code)
    code["untracked"] = list(run.code.untracked)
    return {
        "version": RECORD_VERSION,
        "run": {
            "name": run.name,
            "workflow": run.workflow,
            "owner": run.owner,
            "repository": run.repository,
            "status": run.status.name.lower(),
            "submitted_at_ns": run.submitted_at_ns,
            "finished_at_ns": run.finished_at_ns,
            "args": submission.get("args", list(row.args)),
            "tags": list(run.tags),
        },
        "code": code,
        "resolved_workflow": submission.get("resolved_workflow"),
        # `dstack rerun`: the run this one reruns, how, and what it could not reproduce at submission.
        "rerun_of": submission.get("rerun_of"),
        "jobs": jobs,
    }


async def run_record(core: Core, name: str, grant_code: bool = False) -> RecordWithCode:
    run = await core.run(name)
    record = await core.db(_compose, core, run)
    if not grant_code:
        return RecordWithCode(record)
    code_url = await core.artifacts.code_download_url(run.code.hash) if run.code.hash else ""
    diff_url = await core.artifacts.code_download_url(run.code.diff_hash) if run.code.diff_hash else ""
    return RecordWithCode(record, code_url, diff_url)


async def read_run_code(core: Core, name: str, diff: bool) -> AsyncIterator[bytes]:
    """The run's packed tree (or its uncommitted diff) from the store, for a store that cannot presign."""
    run = await core.run(name)
    blob = run.code.diff_hash if diff else run.code.hash
    if not blob:
        raise NotFound(f"run {name} has no {'uncommitted diff' if diff else 'code'}")
    async for chunk in read_chunks(core.objects, code_key(blob)):
        yield chunk
