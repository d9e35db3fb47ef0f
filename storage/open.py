"""Chooses a backend from a storage URL: s3://BUCKET/PREFIX, file://PATH or a plain path."""

from __future__ import annotations

from pathlib import Path

from dstack.storage.base import ArtifactStore
from dstack.storage.local import LocalStore


def open_store(url: str) -> ArtifactStore:
    if url.startswith("s3://"):
        from dstack.storage.s3 import S3Location, S3Store

        return S3Store(S3Location.parse(url))
    if url.startswith("file://"):
        url = url[len("file://") :]
    return LocalStore(Path(url).expanduser().resolve())
