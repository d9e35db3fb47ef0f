"""Saving a job's declared artifact folders: every file uploaded and checked, then the manifest."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import grpc

from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, client_pb2, common_pb2
from dstack.storage.granted import put_granted
from dstack.storage.transfer import Download, Transfer, TransferError

log = logging.getLogger("dstack.agent")
CHUNK = 1 << 20
T = TypeVar("T")
PARALLEL = 4
GRANT_BATCH = 1000  # files per grant request: keeps each reply far below gRPC's message limit


class ArtifactError(Exception):
    pass


def resolve_inside(workdir: Path, rel: str) -> Path:
    """The artifact path, refusing absolute paths and paths or symlinks that lead out of workdir."""
    if os.path.isabs(rel):
        raise ArtifactError(f"artifact path {rel!r} must be relative to the working directory")
    p = (workdir / rel).resolve()
    if not p.is_relative_to(workdir.resolve()):
        raise ArtifactError(f"artifact path {rel!r} leads outside the working directory")
    return p


def prepare_dirs(workdir: Path, specs: Sequence[common_pb2.ArtifactSpec]) -> None:
    for a in specs:
        resolve_inside(workdir, a.path).mkdir(parents=True, exist_ok=True)


def collect_files(workdir: Path, specs: Sequence[common_pb2.ArtifactSpec]) -> list[tuple[str, Path]]:
    root = workdir.resolve()
    out: dict[str, Path] = {}
    for a in specs:
        base = resolve_inside(workdir, a.path)
        if base.is_file():
            out[base.relative_to(root).as_posix()] = base
            continue
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                p = Path(dirpath) / name
                if p.is_symlink():
                    target = p.resolve()
                    if not target.is_relative_to(root) or not target.is_file():
                        log.warning("skipping symlink %s: it points outside the working directory", p)
                        continue
                if p.is_file():
                    out[p.relative_to(root).as_posix()] = p
    return sorted(out.items())


# path -> ((size, mtime, ctime, inode), file): a rewrite that keeps size and mtime still changes ctime
UploadCache = dict[str, tuple[tuple[int, int, int, int], common_pb2.ArtifactFile]]


def _collect_with_stat(
    workdir: Path, specs: Sequence[common_pb2.ArtifactSpec]
) -> list[tuple[str, Path, tuple[int, int, int, int]]]:
    out = []
    for rel, p in collect_files(workdir, specs):
        st = p.stat()
        out.append((rel, p, (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)))
    return out


async def retry_rpc(
    what: str,
    fn: Callable[[], Awaitable[T]],
    attempts: int,
    retry_for: float,
    final: tuple[grpc.StatusCode, ...],
) -> T:
    """Retries a coordinator call with backoff, at least `attempts` times and for at least `retry_for`
    seconds, unless it fails with one of the `final` codes."""
    delay = 0.2
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await fn()
        except grpc.aio.AioRpcError as e:
            out_of_time = time.monotonic() - start >= retry_for
            if e.code() in final or (attempt >= attempts and out_of_time):
                raise ArtifactError(f"{what} failed: {e.details() or e.code().name}") from e
            log.warning("%s failed (%s); retry %d in %.1fs", what, e.code().name, attempt, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


class Uploader:
    """Sends files straight to the store with presigned URLs the coordinator grants (S3), or streams
    them through the coordinator when its store cannot presign (a local folder)."""

    def __init__(
        self,
        stub: agent_pb2_grpc.AgentServiceStub,
        metadata: Callable[[], list[tuple[str, str]]],
        attempts: int,
        transfer: Transfer,
    ) -> None:
        self.stub = stub
        self.metadata = metadata
        self.attempts = attempts
        self.transfer = transfer

    async def upload(
        self, job_id: str, workdir: Path, specs: Sequence[common_pb2.ArtifactSpec], cache: UploadCache | None = None
    ) -> int:
        """Uploads every file (skipping those in `cache` that did not change since), then commits the
        manifest; returns the number of files."""
        cache = {} if cache is None else cache
        files = await asyncio.to_thread(_collect_with_stat, workdir, specs)
        todo = [(rel, p, key) for rel, p, key in files if (hit := cache.get(rel)) is None or hit[0] != key]
        fresh: dict[str, tuple[tuple[int, int, int, int], common_pb2.ArtifactFile]] = {}
        completed: list[common_pb2.CompletedUpload] = []
        for i in range(0, len(todo), GRANT_BATCH):
            batch = todo[i : i + GRANT_BATCH]
            grant_req = agent_pb2.GrantUploadsRequest(
                job_id=job_id, files=[common_pb2.FileSize(path=rel, size=key[0]) for rel, _, key in batch]
            )
            resp: agent_pb2.GrantUploadsResponse = await self._retry(
                "grant uploads", functools.partial(self.stub.GrantUploads, grant_req, metadata=self.metadata())
            )
            if resp.stream:
                done = await self._stream_all(job_id, batch)
            else:
                done = await self._put_all(batch, list(resp.grants), completed)
            fresh.update({rel: (key, f) for (rel, _, key), f in zip(batch, done, strict=True)})
        manifest = [fresh[rel][1] if rel in fresh else cache[rel][1] for rel, _, _ in files]
        req = agent_pb2.CommitArtifactsRequest(job_id=job_id, files=manifest, completed=completed)
        await self._retry("commit manifest", lambda: self.stub.CommitArtifacts(req, metadata=self.metadata()))
        # Only now: a multipart upload whose commit failed must be sent (and completed) again.
        cache.update(fresh)
        return len(manifest)

    async def _stream_all(
        self, job_id: str, batch: list[tuple[str, Path, tuple[int, int, int, int]]]
    ) -> list[common_pb2.ArtifactFile]:
        sem = asyncio.Semaphore(PARALLEL)

        async def one(rel: str, path: Path) -> common_pb2.ArtifactFile:
            async with sem:
                return await self._retry(f"upload {rel}", lambda: self._upload_file(job_id, rel, path))

        return list(await asyncio.gather(*(one(rel, p) for rel, p, _ in batch)))

    async def _put_all(
        self,
        batch: list[tuple[str, Path, tuple[int, int, int, int]]],
        grants: list[common_pb2.UploadGrant],
        completed: list[common_pb2.CompletedUpload],
    ) -> list[common_pb2.ArtifactFile]:
        files = [(rel, p) for rel, p, _ in batch]
        try:
            manifest, done = await asyncio.to_thread(put_granted, self.transfer, files, grants)
        except TransferError as e:
            raise ArtifactError(str(e)) from e
        completed.extend(done)
        return manifest

    async def _retry(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        # As long as the transfer engine retries the store: the coordinator answers UNAVAILABLE while
        # its store is down.
        final = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
        return await retry_rpc(what, fn, self.attempts, self.transfer.retry_for, final)

    async def _upload_file(self, job_id: str, rel: str, path: Path) -> common_pb2.ArtifactFile:
        digest = hashlib.sha256()
        size = 0
        read_error: OSError | None = None
        try:
            f = await asyncio.to_thread(path.open, "rb")
        except OSError as e:
            raise ArtifactError(f"{rel}: cannot read it: {e.strerror}") from e

        async def requests() -> AsyncIterator[agent_pb2.UploadArtifactRequest]:
            nonlocal size, read_error
            first = True
            while True:
                try:
                    data = await asyncio.to_thread(f.read, CHUNK)
                except OSError as e:
                    read_error = e
                    raise  # grpc cancels the call: the coordinator keeps no partial object
                digest.update(data)
                size += len(data)
                if first:
                    yield agent_pb2.UploadArtifactRequest(job_id=job_id, path=rel, data=data)
                    first = False
                elif data:
                    yield agent_pb2.UploadArtifactRequest(data=data)
                if not data:
                    return

        try:
            resp = await self.stub.UploadArtifact(requests(), metadata=self.metadata())
        except asyncio.CancelledError:
            if read_error is None:
                raise  # a real cancellation (the agent is stopping)
            raise ArtifactError(f"{rel}: reading it failed: {read_error}") from read_error
        finally:
            f.close()
        if resp.sha256 != digest.hexdigest() or resp.size != size:
            raise ArtifactError(f"{rel}: the store received different bytes than were sent")
        return common_pb2.ArtifactFile(path=rel, size=size, sha256=resp.sha256)


def _give_up(e: grpc.aio.AioRpcError, attempt: int, attempts: int) -> bool:
    """A download call is retried unless it is refused for good or out of attempts."""
    return attempt == attempts or e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


class Downloader:
    """Fetches the artifacts of the jobs a job depends on into its working directory, in parallel,
    each file checked against the sha256 in its manifest."""

    def __init__(
        self,
        stub: agent_pb2_grpc.AgentServiceStub,
        metadata: Callable[[], list[tuple[str, str]]],
        attempts: int,
        transfer: Transfer,
    ) -> None:
        self.stub = stub
        self.metadata = metadata
        self.attempts = attempts
        self.transfer = transfer

    async def fetch(self, inputs: Sequence[agent_pb2.ArtifactInput], workdir: Path) -> int:
        sem = asyncio.Semaphore(PARALLEL)

        async def one(src: agent_pb2.ArtifactInput, f: common_pb2.ArtifactFile) -> None:
            async with sem:
                await self._fetch_file(src, f, workdir)

        files = [(src, f) for src in inputs for f in src.files]
        seen: dict[str, agent_pb2.ArtifactInput] = {}
        for src, f in files:
            other = seen.setdefault(f.path, src)
            if other is not src:  # two dependencies would write one file: refuse rather than pick one
                first, second = f"{other.run_name}/{other.job_name}", f"{src.run_name}/{src.job_name}"
                raise ArtifactError(f"{f.path} is an artifact of both {first} and {second}")
        for i in range(0, len(files), GRANT_BATCH):
            batch = files[i : i + GRANT_BATCH]
            req = agent_pb2.GrantDownloadsRequest(
                files=[
                    client_pb2.DownloadArtifactRequest(run_name=src.run_name, job_name=src.job_name, path=f.path)
                    for src, f in batch
                ]
            )
            resp = await self._grant(req)
            if resp.stream:
                await asyncio.gather(*(one(src, f) for src, f in batch))
                continue
            items = [
                Download(url, resolve_inside(workdir, f.path), f.size, f.sha256, f"{f.path} (from {src.run_name})")
                for (src, f), url in zip(batch, resp.urls, strict=True)
            ]
            try:
                await asyncio.to_thread(self.transfer.get_many, items)
            except TransferError as e:
                raise ArtifactError(str(e)) from e
        return len(files)

    async def _grant(self, req: agent_pb2.GrantDownloadsRequest) -> agent_pb2.GrantDownloadsResponse:
        call = functools.partial(self.stub.GrantDownloads, req, metadata=self.metadata())
        final = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        resp: agent_pb2.GrantDownloadsResponse = await retry_rpc("dependency artifacts", call, self.attempts, 0, final)
        return resp

    async def _fetch_file(self, src: agent_pb2.ArtifactInput, f: common_pb2.ArtifactFile, workdir: Path) -> None:
        dest = resolve_inside(workdir, f.path)
        what = f"{f.path} (from {src.run_name}/{src.job_name})"
        for attempt in range(1, self.attempts + 1):
            await asyncio.to_thread(dest.parent.mkdir, parents=True, exist_ok=True)
            fd, tmp_name = await asyncio.to_thread(tempfile.mkstemp, dir=dest.parent, prefix=f".{dest.name}.")
            tmp = Path(tmp_name)
            try:
                digest = hashlib.sha256()
                out = os.fdopen(fd, "wb")
                try:
                    req = client_pb2.DownloadArtifactRequest(run_name=src.run_name, job_name=src.job_name, path=f.path)
                    async for chunk in self.stub.DownloadArtifact(req, metadata=self.metadata()):
                        digest.update(chunk.data)
                        await asyncio.to_thread(out.write, chunk.data)
                finally:
                    out.close()
                if digest.hexdigest() != f.sha256:
                    raise ArtifactError(f"{what}: checksum mismatch (expected {f.sha256}, got {digest.hexdigest()})")
                await asyncio.to_thread(os.replace, tmp, dest)
                return
            except grpc.aio.AioRpcError as e:
                if _give_up(e, attempt, self.attempts):
                    raise ArtifactError(f"{what}: download failed: {e.details() or e.code().name}") from e
                await asyncio.sleep(min(0.2 * 2**attempt, 5.0))
            finally:
                await asyncio.to_thread(tmp.unlink, missing_ok=True)
