"""Saving a job's declared artifact folders: every file uploaded and checked, then the manifest."""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import logging
import os
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dstack.agent.retry import Outcome, RetryPolicy, classify
from dstack.protos.artifact_paths import BadWorkingDir, in_code, recorded, working_dir_prefix
from dstack.protos.container_paths import BadContainerPath, check_container_path, check_disjoint, owning_root
from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, client_pb2, common_pb2
from dstack.storage.errors import ChecksumMismatch, StoreError
from dstack.storage.granted import put_granted_each
from dstack.storage.transfer import Download, Transfer

log = logging.getLogger("dstack.agent")
CHUNK = 1 << 20
PARALLEL = 4
GRANT_BATCH = 1000  # files per grant request: keeps each reply far below gRPC's message limit


class ArtifactError(Exception):
    pass


# Absolute artifact paths: container path -> the job's own folder on the host that is mounted there.
ContainerFolders = dict[str, Path]


def is_absolute(spec_path: str) -> bool:
    return spec_path.startswith("/")


def plan_container_folders(
    base: Path, specs: Sequence[common_pb2.ArtifactSpec], inputs: Sequence[agent_pb2.ArtifactInput]
) -> ContainerFolders:
    """The folders inside the job's container that its absolute artifact paths and its inputs' name, each
    given a host folder of its own: base/0, base/1, ... (base is the job's, next to its code folder). Host
    names come from the position, never from the path, so no path the coordinator sends can lead anywhere
    else on the host; each path is checked anyway (protos/container_paths.py), and nothing is created here."""
    roots: list[str] = []
    try:
        for path in [*(a.path for a in specs if is_absolute(a.path)), *(p for i in inputs for p in i.mount_paths)]:
            norm = check_container_path(path)
            if norm not in roots:
                roots.append(norm)
        check_disjoint(roots)
    except BadContainerPath as e:
        raise ArtifactError(str(e)) from None
    return {root: base / str(i) for i, root in enumerate(roots)}


def make_container_folders(folders: ContainerFolders) -> None:
    """Creates the host folders (fresh: a folder left by a job of the same id is not reused)."""
    for host in folders.values():
        host.parent.mkdir(mode=0o700, exist_ok=True)
        host.mkdir(mode=0o755)


def relative_specs(specs: Sequence[common_pb2.ArtifactSpec]) -> list[common_pb2.ArtifactSpec]:
    return [a for a in specs if not is_absolute(a.path)]


def resolve_inside(workdir: Path, rel: str) -> Path:
    """The artifact path, refusing absolute paths and paths or symlinks that lead out of workdir."""
    if os.path.isabs(rel):
        raise ArtifactError(f"artifact path {rel!r} must be relative to the working directory")
    p = (workdir / rel).resolve()
    if not p.is_relative_to(workdir.resolve()):
        raise ArtifactError(f"artifact path {rel!r} leads outside the working directory")
    return p


def code_path(working_dir: str, path: str) -> str:
    """Where a relative artifact path is under the code root: under the job's working_dir (protos/artifact_paths.py)."""
    try:
        return in_code(working_dir, path)
    except ValueError as e:
        raise ArtifactError(str(e)) from None


def prepare_dirs(workdir: Path, specs: Sequence[common_pb2.ArtifactSpec], working_dir: str = "") -> None:
    try:
        prefix = working_dir_prefix(working_dir)
        if prefix and not (workdir / prefix).is_dir():
            return  # a working_dir the code lacks: the runtime says so, rather than running in a folder made here
    except BadWorkingDir as e:
        raise ArtifactError(str(e)) from None
    for a in relative_specs(specs):
        resolve_inside(workdir, code_path(working_dir, a.path)).mkdir(parents=True, exist_ok=True)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a fifo the job left there returns at once (and fstat refuses it) instead of hanging.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _components(rel: str) -> list[str]:
    if os.path.isabs(rel):
        raise ArtifactError(f"artifact path {rel!r} must be relative to the working directory")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArtifactError(f"artifact path {rel!r} leads outside the working directory")
    return parts


def _open_dir_at(workdir: Path, parts: Sequence[str], rel: str) -> int:
    """A descriptor of workdir/parts, each component opened relative to its parent's descriptor with
    O_NOFOLLOW: a symlink anywhere on the way (even one swapped in a moment ago) is refused, not followed."""
    fd = os.open(workdir, _DIR_FLAGS)
    try:
        for part in parts:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return fd
    except OSError as e:
        os.close(fd)
        raise ArtifactError(f"{rel}: not a folder inside the working directory ({e.strerror})") from None


def open_inside(workdir: Path, rel: str) -> int:
    """A read descriptor of the regular file rel under workdir, no symlink followed on the way; the file
    is checked on that descriptor (fstat), so what is hashed and sent is what was checked."""
    parts = _components(rel)
    if not parts:
        raise ArtifactError(f"artifact path {rel!r} names the working directory itself")
    dir_fd = _open_dir_at(workdir, parts[:-1], rel)
    try:
        fd = os.open(parts[-1], _READ_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        what = "a symlink (not followed)" if e.errno == errno.ELOOP else e.strerror
        raise ArtifactError(f"{rel}: cannot open it inside the working directory: {what}") from None
    finally:
        os.close(dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ArtifactError(f"{rel}: not a regular file (mode {stat.filemode(st.st_mode)})")
    os.set_blocking(fd, True)
    return fd


def _opener(files: Sequence[Located]) -> Callable[[Path], int]:
    by_host = {f.host: f for f in files}
    return lambda p: open_inside(by_host[p].base, by_host[p].rel)


# (size, mtime, ctime, inode): a rewrite that keeps size and mtime still changes ctime
StatKey = tuple[int, int, int, int]


def _key(st: os.stat_result) -> StatKey:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _scan(dir_fd: int, prefix: str, out: dict[str, StatKey]) -> None:
    """The regular files under the folder dir_fd, by descriptor: symlinks, devices and fifos are skipped."""
    with os.scandir(dir_fd) as it:
        entries = list(it)
    for e in entries:
        rel = f"{prefix}/{e.name}" if prefix else e.name
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # gone since it was listed
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(e.name, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError as err:  # swapped for a symlink (ELOOP/ENOTDIR) or removed since
                log.warning("skipping %s: %s", rel, err.strerror)
                continue
            try:
                _scan(sub, rel, out)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            out[rel] = _key(st)
        elif stat.S_ISLNK(st.st_mode):
            log.warning("skipping symlink %s: artifact symlinks are not followed (docs/storage.md)", rel)
        else:
            log.warning("skipping %s: not a regular file (mode %s)", rel, stat.filemode(st.st_mode))


def collect_files(workdir: Path, specs: Sequence[common_pb2.ArtifactSpec]) -> list[tuple[str, StatKey]]:
    """Every regular file in the artifact folders, relative to workdir, walked by folder descriptors
    opened with O_NOFOLLOW: nothing outside workdir is listed, even if the job swaps in symlinks."""
    out: dict[str, StatKey] = {}
    for a in specs:
        parts = _components(a.path)
        base = "/".join(parts)
        if parts:
            parent = _open_dir_at(workdir, parts[:-1], a.path)
            try:
                try:
                    st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):  # an artifact that is one file
                    out[base] = _key(st)
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    log.warning(
                        "skipping artifact %s: not a folder or a regular file (symlinks are not followed)", base
                    )
                    continue
            finally:
                os.close(parent)
        fd = _open_dir_at(workdir, parts, a.path)
        try:
            _scan(fd, base, out)
        finally:
            os.close(fd)
    return sorted(out.items())


# path -> ((size, mtime, ctime, inode), file)
UploadCache = dict[str, tuple[StatKey, common_pb2.ArtifactFile]]


@dataclass(frozen=True)
class Located:
    """One file to save: the path it is recorded under (relative, or absolute inside the container), and
    where it is on the host: a folder and the path under it, opened without following symlinks."""

    path: str
    base: Path
    rel: str
    key: StatKey

    @property
    def host(self) -> Path:
        return self.base / self.rel


def _collect_with_stat(
    workdir: Path, specs: Sequence[common_pb2.ArtifactSpec], folders: ContainerFolders, working_dir: str = ""
) -> list[Located]:
    # Walked from the code root (each component opened with O_NOFOLLOW, working_dir's included), recorded
    # relative to working_dir: the path the workflow wrote.
    in_code_specs = [common_pb2.ArtifactSpec(path=code_path(working_dir, a.path)) for a in relative_specs(specs)]
    out = [Located(recorded(working_dir, rel), workdir, rel, key) for rel, key in collect_files(workdir, in_code_specs)]
    for a in specs:
        if not is_absolute(a.path):
            continue
        root = check_container_path(a.path)
        host = folders.get(root)
        if host is None:
            raise ArtifactError(f"artifact path {a.path!r}: no folder was mounted there")
        whole = common_pb2.ArtifactSpec(path=".")
        out += [Located(f"{root}/{rel}", host, rel, key) for rel, key in collect_files(host, [whole])]
    return out


def _worst(errors: Sequence[StoreError]) -> StoreError:
    """Of a batch's failures, the one that decides what happens next: a final one over an expired
    grant over a transient one (agent/retry.py)."""
    rank = {Outcome.FINAL: 0, Outcome.REMOVED: 0, Outcome.REGRANT: 1, Outcome.REREGISTER: 2, Outcome.RETRY: 3}
    return min(errors, key=lambda e: rank[classify(e)])


class Uploader:
    """Sends files straight to the store with presigned URLs the coordinator grants (S3), or streams
    them through the coordinator when its store cannot presign (a local folder)."""

    def __init__(
        self,
        stub: agent_pb2_grpc.AgentServiceStub,
        metadata: Callable[[], list[tuple[str, str]]],
        policy: RetryPolicy,
        transfer: Transfer,
    ) -> None:
        self.stub = stub
        self.metadata = metadata  # called for every try: a re-registered agent has a new token
        self.policy = policy
        self.transfer = transfer

    async def upload(
        self,
        job_id: str,
        workdir: Path,
        specs: Sequence[common_pb2.ArtifactSpec],
        cache: UploadCache | None = None,
        folders: ContainerFolders | None = None,
        working_dir: str = "",
    ) -> int:
        """Uploads every file (skipping those in `cache` that did not change since), then commits the
        manifest; returns the number of files. `folders`: the host folders of the absolute artifact paths;
        relative paths are under `working_dir` of the code root `workdir`."""
        cache = {} if cache is None else cache
        files = await asyncio.to_thread(_collect_with_stat, workdir, specs, folders or {}, working_dir)
        todo = [f for f in files if (hit := cache.get(f.path)) is None or hit[0] != f.key]
        fresh: dict[str, tuple[tuple[int, int, int, int], common_pb2.ArtifactFile]] = {}
        completed: list[common_pb2.CompletedUpload] = []
        for i in range(0, len(todo), GRANT_BATCH):
            batch = todo[i : i + GRANT_BATCH]
            grant_req = agent_pb2.GrantUploadsRequest(
                job_id=job_id, files=[common_pb2.FileSize(path=f.path, size=f.key[0]) for f in batch]
            )
            resp = await self.policy.call("grant uploads", functools.partial(self._grant, grant_req), ArtifactError)
            if resp.stream:
                done = await self._stream_all(job_id, batch)
            else:
                done = await self._put_all(job_id, batch, list(resp.grants), completed)
            fresh.update({f.path: (f.key, d) for f, d in zip(batch, done, strict=True)})
        manifest = [fresh[f.path][1] if f.path in fresh else cache[f.path][1] for f in files]
        req = agent_pb2.CommitArtifactsRequest(job_id=job_id, files=manifest, completed=completed)
        await self.policy.call(
            "commit manifest", lambda: self.stub.CommitArtifacts(req, metadata=self.metadata()), ArtifactError
        )
        # Only now: a multipart upload whose commit failed must be sent (and completed) again.
        cache.update(fresh)
        return len(manifest)

    async def _stream_all(self, job_id: str, batch: list[Located]) -> list[common_pb2.ArtifactFile]:
        sem = asyncio.Semaphore(PARALLEL)

        async def one(f: Located) -> common_pb2.ArtifactFile:
            async with sem:
                return await self.policy.call(f"upload {f.path}", lambda: self._upload_file(job_id, f), ArtifactError)

        return list(await asyncio.gather(*(one(f) for f in batch)))

    async def _grant(self, req: agent_pb2.GrantUploadsRequest) -> agent_pb2.GrantUploadsResponse:
        resp: agent_pb2.GrantUploadsResponse = await self.stub.GrantUploads(req, metadata=self.metadata())
        return resp

    async def _put_all(
        self,
        job_id: str,
        batch: list[Located],
        grants: list[common_pb2.UploadGrant],
        completed: list[common_pb2.CompletedUpload],
    ) -> list[common_pb2.ArtifactFile]:
        sizes = {f.path: f.key[0] for f in batch}
        saved: dict[str, common_pb2.ArtifactFile] = {}
        fresh: list[common_pb2.UploadGrant] | None = grants
        opener = _opener(batch)

        async def once() -> None:
            nonlocal fresh
            todo = [(f.path, f.host) for f in batch if f.path not in saved]
            if fresh is None:  # a later try: new grants for the files not saved yet (some had expired)
                req = agent_pb2.GrantUploadsRequest(
                    job_id=job_id, files=[common_pb2.FileSize(path=rel, size=sizes[rel]) for rel, _ in todo]
                )
                fresh = list((await self._grant(req)).grants)
            by_path = {g.path: g for g in fresh}
            fresh = None
            grants = [by_path[r] for r, _ in todo]
            results = await asyncio.to_thread(put_granted_each, self.transfer, todo, grants, opener)
            errors = []
            for (rel, _), r in zip(todo, results, strict=True):
                if isinstance(r, StoreError):
                    errors.append(r)
                    continue
                saved[rel] = r[0]
                if r[1] is not None:
                    completed.append(r[1])
            if errors:
                raise _worst(errors)

        await self.policy.call(f"upload of {len(batch)} file(s)", once, ArtifactError)
        return [saved[f.path] for f in batch]

    async def _upload_file(self, job_id: str, located: Located) -> common_pb2.ArtifactFile:
        rel = located.path
        digest = hashlib.sha256()
        size = 0
        read_error: OSError | None = None
        try:
            # Opened without following symlinks and checked on the descriptor it is read from.
            f = os.fdopen(await asyncio.to_thread(open_inside, located.base, located.rel), "rb")
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
            raise ChecksumMismatch(f"{rel}: the store received different bytes than were sent")
        return common_pb2.ArtifactFile(path=rel, size=size, sha256=resp.sha256)


def input_destination(
    src: agent_pb2.ArtifactInput,
    f: common_pb2.ArtifactFile,
    workdir: Path,
    folders: ContainerFolders,
    working_dir: str = "",
) -> Path:
    """Where an input file goes on the host: under the job's working_dir in workdir (a relative path: where the
    producer's was under its own working_dir, as 2022's runner mounted it), or, for a file of one of the
    producer's absolute artifact paths, under the job's host folder for that path. A path that is neither
    (not normalised, `..`, outside every path its producer declared) is refused, not written."""
    if not is_absolute(f.path):
        return resolve_inside(workdir, code_path(working_dir, f.path))
    try:
        norm = check_container_path(f.path)
    except BadContainerPath as e:
        raise ArtifactError(f"input {src.run_name}/{src.job_name}: {e}") from None
    declared = [check_container_path(p) for p in src.mount_paths] if norm == f.path else []
    root = owning_root(norm, [r for r in declared if r in folders])
    if root is None:
        raise ArtifactError(
            f"input {src.run_name}/{src.job_name}: {f.path!r} is in none of the absolute artifact paths it declares"
        )
    return resolve_inside(folders[root], norm[len(root) + 1 :])


class Downloader:
    """Fetches the artifacts of the jobs a job depends on into its working directory, in parallel,
    each file checked against the sha256 in its manifest."""

    def __init__(
        self,
        stub: agent_pb2_grpc.AgentServiceStub,
        metadata: Callable[[], list[tuple[str, str]]],
        policy: RetryPolicy,
        transfer: Transfer,
    ) -> None:
        self.stub = stub
        self.metadata = metadata  # called for every try: a re-registered agent has a new token
        self.policy = policy
        self.transfer = transfer

    async def fetch(
        self,
        inputs: Sequence[agent_pb2.ArtifactInput],
        workdir: Path,
        folders: ContainerFolders | None = None,
        working_dir: str = "",
    ) -> int:
        """Relative files go under workdir, files of an absolute artifact path into the job's own host
        folder for it (`folders`, from plan_container_folders), never anywhere else."""
        sem = asyncio.Semaphore(PARALLEL)
        folders = folders or {}
        dests = {
            (src.run_name, src.job_name, f.path): input_destination(src, f, workdir, folders, working_dir)
            for src in inputs
            for f in src.files
        }

        async def one(src: agent_pb2.ArtifactInput, f: common_pb2.ArtifactFile) -> None:
            async with sem:
                await self._fetch_file(src, f, dests[(src.run_name, src.job_name, f.path)])

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
            else:
                await self._get_all(batch, list(resp.urls), dests)
        return len(files)

    async def _grant(self, req: agent_pb2.GrantDownloadsRequest) -> agent_pb2.GrantDownloadsResponse:
        resp: agent_pb2.GrantDownloadsResponse = await self.policy.call(
            "dependency artifacts", lambda: self.stub.GrantDownloads(req, metadata=self.metadata()), ArtifactError
        )
        return resp

    async def _get_all(
        self,
        batch: list[tuple[agent_pb2.ArtifactInput, common_pb2.ArtifactFile]],
        urls: list[str],
        dests: dict[tuple[str, str, str], Path],
    ) -> None:
        """Fetches with presigned URLs; a later try asks for new URLs for the files not saved yet."""
        left = list(range(len(batch)))
        fresh: list[str] | None = urls

        async def once() -> None:
            nonlocal left, fresh
            if fresh is None:
                req = agent_pb2.GrantDownloadsRequest(
                    files=[
                        client_pb2.DownloadArtifactRequest(
                            run_name=batch[i][0].run_name, job_name=batch[i][0].job_name, path=batch[i][1].path
                        )
                        for i in left
                    ]
                )
                fresh = list((await self.stub.GrantDownloads(req, metadata=self.metadata())).urls)
            items = [
                Download(
                    url,
                    dests[(batch[i][0].run_name, batch[i][0].job_name, batch[i][1].path)],
                    batch[i][1].size,
                    batch[i][1].sha256,
                    f"{batch[i][1].path} (from {batch[i][0].run_name})",
                )
                for i, url in zip(left, fresh, strict=True)
            ]
            fresh = None
            results = await asyncio.to_thread(self.transfer.get_each, items)
            left = [i for i, r in zip(left, results, strict=True) if r is not None]
            errors = [r for r in results if r is not None]
            if errors:
                raise _worst(errors)

        await self.policy.call(f"download of {len(batch)} file(s)", once, ArtifactError)

    async def _fetch_file(self, src: agent_pb2.ArtifactInput, f: common_pb2.ArtifactFile, dest: Path) -> None:
        what = f"{f.path} (from {src.run_name}/{src.job_name})"
        await self.policy.call(what, lambda: self._stream_file(src, f, dest, what), ArtifactError)

    async def _stream_file(
        self, src: agent_pb2.ArtifactInput, f: common_pb2.ArtifactFile, dest: Path, what: str
    ) -> None:
        """One try at streaming a file through the coordinator (a store that cannot presign)."""
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
                raise ChecksumMismatch(f"{what}: checksum mismatch (expected {f.sha256}, got {digest.hexdigest()})")
            await asyncio.to_thread(os.replace, tmp, dest)
        finally:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
