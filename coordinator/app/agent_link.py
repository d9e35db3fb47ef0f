"""What an agent does with its jobs' files: fetch their code and inputs, upload and commit
artifacts, get grants. Each call first passes coordinator/app/agent_scope.py: only the agent's own
running jobs, their code and their declared inputs. (Its stream of messages is
coordinator/app/agent_stream.py.)"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

from dstack.coordinator.app import artifacts, code
from dstack.coordinator.app.agent_scope import check_code, check_inputs, own_job
from dstack.coordinator.app.artifacts import FileEntry
from dstack.coordinator.app.core import Core
from dstack.coordinator.app.transfer import put_from_stream
from dstack.coordinator.artifacts import artifact_key, check_job_artifact_path
from dstack.coordinator.model import CompletedUpload, FileSize, UploadGrant

log = logging.getLogger("dstack.coordinator")


async def upload_artifact(
    core: Core, agent_id: str, job_id: str, path: str, chunks: AsyncIterator[bytes]
) -> tuple[int, str]:
    """One artifact file of the agent's job, streamed through the coordinator; returns size and sha256."""
    job = await own_job(core, agent_id, job_id)
    key = artifact_key(job.run_name, job.job_name, check_job_artifact_path(path))
    return await put_from_stream(core.objects, key, chunks)


async def commit_artifacts(
    core: Core,
    agent_id: str,
    job_id: str,
    files: Sequence[FileEntry],
    completed: Sequence[CompletedUpload],
) -> None:
    job = await own_job(core, agent_id, job_id)
    checked = [(check_job_artifact_path(p), size, sha) for p, size, sha in files]
    await core.artifacts.commit(job.run_name, job.job_name, checked, completed)
    await core.db(core.store.save_artifacts, job.id, checked)
    core.engine.metrics.artifact_bytes.inc(sum(size for _, size, _ in checked))


async def grant_uploads(core: Core, agent_id: str, job_id: str, files: Sequence[FileSize]) -> list[UploadGrant] | None:
    """Presigned upload grants for the agent's job, or None: the store cannot presign (stream them)."""
    job = await own_job(core, agent_id, job_id)
    if not core.artifacts.presigns:
        return None
    return await core.artifacts.grant_uploads(job.run_name, job.job_name, files)


async def read_code(core: Core, agent_id: str, code_hash: str) -> AsyncIterator[bytes]:
    """The code of one of the agent's jobs, in chunks."""
    await check_code(core, agent_id, code_hash)
    async for chunk in code.read_code(core, code_hash):
        yield chunk


async def code_download_url(core: Core, agent_id: str, code_hash: str) -> str:
    """A presigned URL of the code of one of the agent's jobs, or "" (then read_code)."""
    await check_code(core, agent_id, code_hash)
    return await code.code_download_url(core, code_hash)


async def download_input(core: Core, agent_id: str, run_name: str, job_name: str, path: str) -> AsyncIterator[bytes]:
    """One artifact file that one of the agent's jobs takes as input, in chunks."""
    await check_inputs(core, agent_id, [(run_name, job_name)])
    async for chunk in artifacts.download(core, run_name, job_name, path):
        yield chunk


async def input_download_urls(core: Core, agent_id: str, files: Sequence[tuple[str, str, str]]) -> list[str] | None:
    """Presigned GET URLs of (run, job, path) artifacts that the agent's jobs take as inputs, or None
    when the store cannot presign (then download_input)."""
    await check_inputs(core, agent_id, [(run, job) for run, job, _ in files])
    return await artifacts.recorded_download_urls(core, files)
