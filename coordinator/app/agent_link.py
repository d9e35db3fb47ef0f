"""What an agent does with its jobs' files: upload and commit artifacts, get upload grants.
(Its stream of messages is coordinator/app/agent_stream.py.)"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

from dstack.coordinator.app.artifacts import FileEntry
from dstack.coordinator.app.core import Core
from dstack.coordinator.app.transfer import put_from_stream
from dstack.coordinator.artifacts import artifact_key, check_relative_path
from dstack.coordinator.attempts import parse_wire_job_id
from dstack.coordinator.errors import Conflict
from dstack.coordinator.model import CompletedUpload, FileSize, UploadGrant
from dstack.coordinator.store import JobLocation

log = logging.getLogger("dstack.coordinator")


async def own_job(core: Core, agent_id: str, wire_id: str) -> JobLocation:
    """The job of the attempt an agent names (coordinator/attempts.py): it must be the job's current
    attempt, on this agent; a lost agent's late uploads for an attempt that is over are refused."""
    job_id, attempt = parse_wire_job_id(wire_id)
    job = await core.db(core.store.job_location, job_id)
    if job.agent_id != agent_id:
        raise Conflict(f"job {job_id} is not assigned to this agent")
    if job.attempt != attempt:
        raise Conflict(f"attempt {attempt} of job {job_id} is over (the job is at attempt {job.attempt})")
    return job


async def upload_artifact(
    core: Core, agent_id: str, job_id: str, path: str, chunks: AsyncIterator[bytes]
) -> tuple[int, str]:
    """One artifact file of the agent's job, streamed through the coordinator; returns size and sha256."""
    job = await own_job(core, agent_id, job_id)
    key = artifact_key(job.run_name, job.job_name, check_relative_path(path))
    return await put_from_stream(core.objects, key, chunks)


async def commit_artifacts(
    core: Core,
    agent_id: str,
    job_id: str,
    files: Sequence[FileEntry],
    completed: Sequence[CompletedUpload],
) -> None:
    job = await own_job(core, agent_id, job_id)
    checked = [(check_relative_path(p), size, sha) for p, size, sha in files]
    await core.artifacts.commit(job.run_name, job.job_name, checked, completed)
    await core.db(core.store.save_artifacts, job.id, checked)


async def grant_uploads(core: Core, agent_id: str, job_id: str, files: Sequence[FileSize]) -> list[UploadGrant] | None:
    """Presigned upload grants for the agent's job, or None: the store cannot presign (stream them)."""
    job = await own_job(core, agent_id, job_id)
    if not core.artifacts.presigns:
        return None
    return await core.artifacts.grant_uploads(job.run_name, job.job_name, files)
