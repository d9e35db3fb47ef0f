"""`dstack artifacts list|download|upload`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstack.cli.errors import CliError, NotFoundError

if TYPE_CHECKING:
    from dstack.cli.client import Client


def list_command(run_name: str, as_json: bool) -> None:
    from dstack.cli.session import connect

    files = connect().list_artifacts(run_name)
    if as_json:
        json.dump(
            [{"job": f.job_name, "path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
        return
    from dstack.cli.term import Term

    Term().table(("JOB", "PATH", "SIZE"), [[f.job_name, f.path, _size(f.size)] for f in files])


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def _selected(path: str, wanted: str) -> bool:
    wanted, path = wanted.strip("/"), _local(path)
    return not wanted or path == wanted or path.startswith(wanted + "/")


def _local(path: str) -> str:
    """Where a recorded artifact path goes under the output folder: an absolute one (a folder inside the
    job's container, e.g. /opt/conda/envs/myenv/...) without its leading '/', never at that path here."""
    return path.lstrip("/")


def download_command(run_name: str, output: Path, path: str = "") -> None:
    """Downloads the run's artifacts (all, or those at or under PATH) into OUTPUT, keeping their paths;
    each file is checked by sha256 before it is put in place."""
    from dstack.cli.session import connect
    from dstack.cli.transfers import progress

    root = output.resolve()
    n = download_artifacts(connect(), run_name, root, path, progress)
    print(f"{n} file(s) downloaded to {root}", file=sys.stderr)


def download_artifacts(
    client: Client,
    run_name: str,
    root: Path,
    path: str = "",
    progress: Callable[[str, int], AbstractContextManager[Callable[[int], None]]] | None = None,
) -> list[Path]:
    """`dstack artifacts download`'s and the SDK's: the run's artifacts at or under `path` (all for "") into
    the folder `root`, checked by sha256; returns the files written. `progress(description, total_bytes)`
    gives an `advance(nbytes)` callback (the CLI's progress bar)."""
    from dstack.storage.transfer import Download, Transfer, TransferError

    listing = client.list_artifacts_with_urls(run_name)
    pairs = [(f, u) for f, u in zip(listing.files, list(listing.urls) or [""] * len(listing.files), strict=True)]
    pairs = [(f, u) for f, u in pairs if _selected(f.path, path)]
    if path and not pairs:
        raise NotFoundError(f"run {run_name!r} has no artifact at {path!r} (see `dstack artifacts list {run_name}`)")
    root = root.resolve()
    for f, _ in pairs:
        if not (root / _local(f.path)).resolve().is_relative_to(root):
            raise CliError(f"artifact path {f.path!r} leads outside {root}; refusing to write it")
    total = sum(f.size for f, _ in pairs)
    with (progress or _no_progress)(f"{run_name}: {len(pairs)} file(s)", total) as advance:
        if all(u for _, u in pairs):
            items = [Download(u, root / _local(f.path), f.size, f.sha256, f.path) for f, u in pairs]
            with Transfer(retry_for=60.0, progress=advance) as t:
                try:
                    t.get_many(items)
                except TransferError as e:
                    raise CliError(str(e)) from None
        else:  # the coordinator's store cannot presign: it streams the bytes
            for f, _ in pairs:
                _stream_one(client, run_name, f, root / _local(f.path), advance)
    return [root / _local(f.path) for f, _ in pairs]


@contextlib.contextmanager
def _no_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


def _stream_one(client: Any, run_name: str, f: Any, dest: Path, advance: Any) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.urandom(4).hex()}.part")
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for chunk in client.download(run_name, f.job_name, f.path):
                digest.update(chunk)
                out.write(chunk)
                advance(len(chunk))
        if digest.hexdigest() != f.sha256:
            raise CliError(
                f"{f.path}: checksum mismatch: expected sha256 {f.sha256}, got {digest.hexdigest()};"
                " the file was not saved"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _collect(folder: Path, prefix: str = "") -> list[tuple[str, Path]]:
    """The files under `folder` and the paths they get: relative to `folder` itself (its contents are the
    artifact set, as a job's working directory would hold them), under `prefix` when one is given."""
    folder = folder.resolve()
    if not folder.is_dir():
        raise CliError(f"{folder} is not a folder")
    out = []
    for dirpath, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            p = Path(dirpath) / name
            if p.is_symlink() and not p.resolve().is_relative_to(folder):
                print(f"skipping {p}: a symlink out of {folder}", file=sys.stderr)
                continue
            if p.is_file():
                out.append((posixpath.join(prefix, p.relative_to(folder).as_posix()), p))
    if not out:
        raise CliError(f"{folder} has no files to upload")
    return out


def _check_prefix(prefix: str) -> str:
    if not prefix:
        return ""
    norm = posixpath.normpath(prefix)
    if prefix.startswith("/") or norm == ".." or norm.startswith("../"):
        raise CliError(f"--prefix {prefix!r} must be a relative path inside the working directory")
    return "" if norm == "." else norm


def _outside_declared(workflow: str, paths: list[str]) -> tuple[list[str], list[str]]:
    """Where the project's workflow WORKFLOW saves its artifacts, and the paths not under any of them
    (nothing to say when there is no such workflow here)."""
    from dstack.cli.workflows import artifact_paths, find_project_root

    try:
        declared = artifact_paths(find_project_root(Path.cwd()), workflow)
    except CliError:
        return [], []
    if not declared:
        return [], []
    outside = [p for p in paths if not any(p == d or p.startswith(d.rstrip("/") + "/") for d in declared)]
    return declared, outside


def upload_command(folder: Path, tag: str, workflow: str, prefix: str = "") -> None:
    """Publishes a local folder as a tagged artifact set that `depends-on: WORKFLOW:TAG` and
    `deps: - tag: TAG` can use."""
    from dstack.cli.session import connect
    from dstack.cli.transfers import progress
    from dstack.protos.v1 import common_pb2
    from dstack.storage.transfer import Transfer, TransferError

    files = _collect(folder, _check_prefix(prefix))
    declared, outside = _outside_declared(workflow, [rel for rel, _ in files])
    if outside:
        print(
            f"warning: workflow {workflow!r} saves its artifacts under {', '.join(declared)}; {len(outside)} of these"
            f" files are not under it (e.g. {outside[0]}): `--prefix` puts them under a folder",
            file=sys.stderr,
        )
    from dstack.cli.repository import current_repository

    client = connect()
    sizes = [(rel, p, p.stat().st_size) for rel, p in files]
    file_sizes = [common_pb2.FileSize(path=r, size=s) for r, _, s in sizes]
    created = client.create_upload(workflow, tag, file_sizes, current_repository())
    manifest: list[common_pb2.ArtifactFile] = []
    completed: list[common_pb2.CompletedUpload] = []
    with progress(f"{tag}: {len(sizes)} file(s)", sum(s for _, _, s in sizes)) as advance:
        if created.stream:
            for rel, p, _ in sizes:
                resp = client.put_artifact(created.run_name, rel, _chunks(p, advance))
                manifest.append(common_pb2.ArtifactFile(path=rel, size=resp.size, sha256=resp.sha256))
        else:
            from dstack.storage.granted import put_granted

            with Transfer(retry_for=60.0, progress=advance) as t:
                try:
                    manifest, completed = put_granted(t, files, created.grants)
                except TransferError as e:
                    raise CliError(f"{e} (the upload {created.run_name} is unfinished: `dstack rm` it)") from None
    run = client.commit_upload(created.run_name, manifest, completed)
    total = sum(f.size for f in manifest)
    print(
        f"{tag} -> {run.name}: {len(manifest)} file(s), {_size(total)} ({workflow}, in {run.repository})",
        file=sys.stderr,
    )


def _chunks(path: Path, advance: Any) -> Any:
    with path.open("rb") as f:
        while data := f.read(1 << 20):
            advance(len(data))
            yield data
