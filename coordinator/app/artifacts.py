"""Artifacts: listing and downloading a run's files, and uploading a local folder as a run."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from dstack.coordinator.app.core import Core
from dstack.coordinator.app.ownership import Actor, check_owner
from dstack.coordinator.app.runs import NAME, check_tag_name
from dstack.coordinator.app.transfer import put_from_stream, read_chunks
from dstack.coordinator.artifacts import artifact_key, check_job_artifact_path, check_relative_path
from dstack.coordinator.errors import InvalidRequest
from dstack.coordinator.model import ArtifactFile, CompletedUpload, FileSize, RunView, UploadGrant
from dstack.coordinator.repositories import run_repository

FileEntry = tuple[str, int, str]  # path, size, sha256


@dataclass(frozen=True)
class ArtifactListing:
    files: list[ArtifactFile]
    urls: list[str]  # one per file when asked for and possible, else none


@dataclass(frozen=True)
class Upload:
    run_name: str
    stream: bool  # the store cannot presign: send each file with put_upload_file
    grants: list[UploadGrant] = field(default_factory=list)


async def list_artifacts(core: Core, run_name: str, with_urls: bool = False) -> ArtifactListing:
    run = await core.db(core.store.run_by_name, run_name)
    rows = await core.db(core.store.list_artifacts, run.id)
    urls: list[str] = []
    if with_urls and core.artifacts.presigns:
        urls = await core.artifacts.download_urls([artifact_key(run.name, r.job_name, r.path) for r in rows])
    files = [ArtifactFile(r.job_name, r.path, r.size, r.sha256) for r in rows]
    return ArtifactListing(files, urls)


async def download(core: Core, run_name: str, job_name: str, path: str) -> AsyncIterator[bytes]:
    """One recorded artifact file of a run's job, in chunks (for users and for agents' job inputs)."""
    check_job_artifact_path(path)  # only recorded paths are served; one that could never be is refused as such
    run = await core.db(core.store.run_by_name, run_name)
    await core.db(core.store.artifact, run.id, job_name, path)  # NOT_FOUND if not recorded
    async for chunk in read_chunks(core.objects, artifact_key(run.name, job_name, path)):
        yield chunk


async def recorded_download_urls(core: Core, files: Sequence[tuple[str, str, str]]) -> list[str] | None:
    """Presigned GET URLs of recorded artifacts (run, job, path) only: NOT_FOUND for any other.
    None when the store cannot presign: then download them."""
    if not core.artifacts.presigns:
        return None

    def keys() -> list[str]:
        out = []
        runs: dict[str, str] = {}
        for run_name, job_name, path in files:
            if run_name not in runs:
                runs[run_name] = core.store.run_by_name(run_name).id
            core.store.artifact(runs[run_name], job_name, path)
            out.append(artifact_key(run_name, job_name, path))
        return out

    return await core.artifacts.download_urls(await core.db(keys))


async def create_upload(
    core: Core, owner: str, workflow: str, tag: str, files: Sequence[FileSize], repository: str = ""
) -> Upload:
    """`dstack artifacts upload DIR -t TAG`: a run with one done job whose artifacts are the files, in
    `repository` (as a submission names it), where the tag goes."""
    check_tag_name(tag)
    repo = run_repository(repository, "", owner)
    if not NAME.fullmatch(workflow):
        raise InvalidRequest(f"invalid workflow name {workflow!r}")
    for f in files:  # before the run exists: a refused upload leaves nothing behind
        check_relative_path(f.path)
    _, name, _ = await core.db(core.store.create_upload_run, owner, workflow, tag, repo)
    if not core.artifacts.presigns:
        return Upload(name, stream=True)
    return Upload(name, stream=False, grants=await core.artifacts.grant_uploads(name, workflow, files))


async def put_upload_file(
    core: Core, actor: Actor, run_name: str, path: str, chunks: AsyncIterator[bytes]
) -> tuple[int, str]:
    """One file of an upload run, streamed through the coordinator; returns size and sha256."""
    await _check_upload_owner(core, actor, run_name)
    job = await core.db(core.store.upload_job, run_name)
    key = artifact_key(run_name, job.job_name, check_relative_path(path))
    return await put_from_stream(core.objects, key, chunks)


async def _check_upload_owner(core: Core, actor: Actor, run_name: str) -> None:
    run = await core.db(core.store.run_by_name, run_name)
    check_owner(actor, run.owner, f"add files to the upload {run_name}")


async def commit_upload(
    core: Core, actor: Actor, run_name: str, files: Sequence[FileEntry], completed: Sequence[CompletedUpload]
) -> RunView:
    await _check_upload_owner(core, actor, run_name)
    job = await core.db(core.store.upload_job, run_name)
    checked = [(check_relative_path(p), size, sha) for p, size, sha in files]
    await core.artifacts.commit(run_name, job.job_name, checked, completed)
    await core.db(core.store.finish_upload_run, run_name, checked)
    core.engine.metrics.artifact_bytes.inc(sum(size for _, size, _ in checked))
    return await core.run(run_name)
