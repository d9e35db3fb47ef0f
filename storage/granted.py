"""Sending files with grants from the coordinator (the protocol's side of storage/transfer.py),
shared by agents (job artifacts) and the CLI (`dstack artifacts upload`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from dstack.protos.v1 import common_pb2
from dstack.storage.base import UploadGrant
from dstack.storage.errors import StoreError
from dstack.storage.transfer import Transfer


def grant_from_proto(g: common_pb2.UploadGrant) -> UploadGrant:
    return UploadGrant(
        key=g.path, url=g.url, upload_id=g.upload_id, part_size=g.part_size, part_urls=tuple(g.part_urls)
    )


def put_granted(
    transfer: Transfer, files: Sequence[tuple[str, Path]], grants: Sequence[common_pb2.UploadGrant]
) -> tuple[list[common_pb2.ArtifactFile], list[common_pb2.CompletedUpload]]:
    """Uploads each (path, local file) with its grant, in parallel (blocking: run it in a thread).
    Returns the manifest entries, and the multipart uploads the coordinator must complete at commit."""
    results = transfer.put_many(
        [(local, grant_from_proto(g), rel) for (rel, local), g in zip(files, grants, strict=True)]
    )
    manifest, completed = [], []
    for (rel, _), g, r in zip(files, grants, results, strict=True):
        manifest.append(common_pb2.ArtifactFile(path=rel, size=r.size, sha256=r.sha256))
        if g.upload_id:
            completed.append(common_pb2.CompletedUpload(path=rel, upload_id=g.upload_id, etags=r.etags))
    return manifest, completed


def put_granted_each(
    transfer: Transfer,
    files: Sequence[tuple[str, Path]],
    grants: Sequence[common_pb2.UploadGrant],
    opener: Callable[[Path], int] | None = None,
) -> list[tuple[common_pb2.ArtifactFile, common_pb2.CompletedUpload | None] | StoreError]:
    """Like put_granted, but every file's own outcome, so that a caller can ask again for the grants
    that expired and send only those files (blocking: run it in a thread)."""
    results = transfer.put_each(
        [(local, grant_from_proto(g), rel) for (rel, local), g in zip(files, grants, strict=True)], opener
    )
    out: list[tuple[common_pb2.ArtifactFile, common_pb2.CompletedUpload | None] | StoreError] = []
    for (rel, _), g, r in zip(files, grants, results, strict=True):
        if isinstance(r, StoreError):
            out.append(r)
            continue
        done = common_pb2.CompletedUpload(path=rel, upload_id=g.upload_id, etags=r.etags) if g.upload_id else None
        out.append((common_pb2.ArtifactFile(path=rel, size=r.size, sha256=r.sha256), done))
    return out
