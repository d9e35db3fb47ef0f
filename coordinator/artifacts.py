"""Artifact bookkeeping shared by the agent and client services: grants (presigned URLs), commits
(manifest written last), deletion, and the key layout (docs/storage.md).

Who holds credentials: only the coordinator. CLIs and agents get presigned URLs for the exact objects
they may read or write, valid for URL_TTL_S; with a store that cannot presign (a local folder) the
coordinator streams the bytes itself. So no GPU box and no laptop carries storage keys, revoking an
agent revokes its storage access, and this works on every S3-compatible store (STS is not universal).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import posixpath
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from dstack.coordinator.errors import InvalidRequest
from dstack.coordinator.model import CompletedUpload, FileSize, UploadGrant
from dstack.protos.artifact_paths import BadWorkingDir, working_dir_prefix
from dstack.protos.container_paths import ROOTFS_PREFIX, BadContainerPath, check_container_path, is_container_path
from dstack.storage import ArtifactStore, ObjectNotFound
from dstack.storage.base import UploadGrant as StoreGrant

URL_TTL_S = 3600
T = TypeVar("T")
_HASH = re.compile(r"^[0-9a-f]{64}$")


def check_relative_path(path: str) -> str:
    """The normalised artifact path, refusing any that could leave the job's folder."""
    norm = posixpath.normpath(path)
    if not path or path.startswith("/") or norm.startswith("..") or norm == "." or "\x00" in path:
        raise InvalidRequest(f"artifact path {path!r} must be relative and inside the working directory")
    return norm


def check_working_dir(job_name: str, working_dir: str) -> None:
    """A job's working_dir, under which its relative artifacts are saved and received (protos/artifact_paths.py),
    must stay inside its code."""
    try:
        working_dir_prefix(working_dir)
    except BadWorkingDir as e:
        raise InvalidRequest(f"job {job_name!r}: {e}") from None


def check_job_artifact_path(path: str) -> str:
    """A path a job's agent saves: relative to its working directory, or absolute, inside its container
    (an absolute artifact path, protos/container_paths.py), under the same rules the agent and CLI apply."""
    if not is_container_path(path):
        return check_relative_path(path)
    try:
        norm = check_container_path(path)
    except BadContainerPath as e:
        raise InvalidRequest(str(e)) from None
    if norm != path:  # recorded as sent: one file, one name
        raise InvalidRequest(f"artifact path {path!r} is not normalised (expected {norm!r})")
    return norm


def code_key(code_hash: str) -> str:
    if not _HASH.fullmatch(code_hash):
        raise InvalidRequest(f"invalid code hash {code_hash!r}")
    return f"code/{code_hash}.tar.gz"


def job_prefix(run_name: str, job_name: str) -> str:
    return f"runs/{run_name}/{job_name}"


def artifact_key(run_name: str, job_name: str, path: str) -> str:
    """Relative paths under artifacts/, absolute ones (files of a folder inside the job's container) under
    rootfs/, so that `/opt/x` and `opt/x` are two objects."""
    if is_container_path(path):
        return f"{job_prefix(run_name, job_name)}/{ROOTFS_PREFIX}{path}"
    return f"{job_prefix(run_name, job_name)}/artifacts/{path}"


def manifest_key(run_name: str, job_name: str) -> str:
    return f"{job_prefix(run_name, job_name)}/manifest.json"


def logs_key(run_name: str, job_name: str) -> str:
    return f"{job_prefix(run_name, job_name)}/logs.jsonl.gz"


def grant_of(path: str, g: StoreGrant) -> UploadGrant:
    return UploadGrant(path=path, url=g.url, upload_id=g.upload_id, part_size=g.part_size, part_urls=list(g.part_urls))


class Artifacts:
    """Blocking store calls run on worker threads; every method here is a coroutine."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    @property
    def presigns(self) -> bool:
        return self.store.presigns

    async def code_upload_url(self, code_hash: str) -> str:
        if not self.store.presigns:
            return ""
        grant = await self._io(self.store.grant_upload, code_key(code_hash), 0, URL_TTL_S)
        return grant.url

    async def code_download_url(self, code_hash: str) -> str:
        return await self._io(self.store.presign_get, code_key(code_hash), URL_TTL_S) if self.store.presigns else ""

    async def verify_code(self, code_hash: str) -> int | None:
        """The size of the uploaded code blob if it is in the store with the right content, else None.
        A blob that does not match its name is deleted: content addressing must not be poisoned."""

        def check() -> int | None:
            key = code_key(code_hash)
            digest, size = hashlib.sha256(), 0
            try:
                with self.store.open_read(key) as f:
                    while chunk := f.read(1 << 20):
                        digest.update(chunk)
                        size += len(chunk)
            except ObjectNotFound:
                return None
            if digest.hexdigest() != code_hash:
                self.store.delete_prefix(key)
                raise InvalidRequest(f"the uploaded code does not match its hash {code_hash[:12]}: upload it again")
            return size

        return await self._io(check)

    async def grant_uploads(self, run_name: str, job_name: str, files: Sequence[FileSize]) -> list[UploadGrant]:
        """A grant per file, in order; a path that could leave the job's folder is refused first."""
        keys = [artifact_key(run_name, job_name, check_job_artifact_path(f.path)) for f in files]

        def grant() -> list[UploadGrant]:
            return [
                grant_of(f.path, self.store.grant_upload(key, f.size, URL_TTL_S))
                for f, key in zip(files, keys, strict=True)
            ]

        return await self._io(grant)

    async def download_urls(self, keys: Sequence[str]) -> list[str]:
        def sign() -> list[str]:
            return [self.store.presign_get(k, URL_TTL_S) for k in keys]

        return await self._io(sign)

    async def commit(
        self,
        run_name: str,
        job_name: str,
        files: Sequence[tuple[str, int, str]],
        completed: Sequence[CompletedUpload],
    ) -> None:
        """Completes multipart uploads, checks every listed file is in the store at its size, then
        writes the manifest: its presence means the job's artifacts are complete."""

        def work() -> None:
            for c in completed:
                self.store.complete_upload(artifact_key(run_name, job_name, c.path), c.upload_id, list(c.etags))
            present = {}
            if files:
                present = self.store.list_prefix(f"{job_prefix(run_name, job_name)}/artifacts/")
                if any(is_container_path(p) for p, _, _ in files):
                    present |= self.store.list_prefix(f"{job_prefix(run_name, job_name)}/{ROOTFS_PREFIX}/")
            for path, size, _ in files:
                got = present.get(artifact_key(run_name, job_name, path))
                if got is None:
                    raise InvalidRequest(f"artifact {path!r} was not uploaded")
                if got != size:
                    raise InvalidRequest(f"artifact {path!r} is {got} bytes in the store, {size} were sent")
            manifest = {
                "run": run_name,
                "job": job_name,
                "files": [{"path": p, "size": s, "sha256": h} for p, s, h in files],
            }
            self.store.put_bytes(manifest_key(run_name, job_name), json.dumps(manifest, indent=1).encode())

        await self._io(work)

    async def delete_run(self, run_name: str) -> int:
        return await self._io(self.store.delete_prefix, f"runs/{run_name}")

    async def delete_job_artifacts(self, run_name: str, job_name: str) -> int:
        def work() -> int:
            n = self.store.delete_prefix(f"{job_prefix(run_name, job_name)}/artifacts")
            n += self.store.delete_prefix(f"{job_prefix(run_name, job_name)}/{ROOTFS_PREFIX}/")
            n += self.store.delete_prefix(manifest_key(run_name, job_name))
            return n

        return await self._io(work)
