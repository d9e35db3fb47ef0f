"""Chooses a backend from a storage URL."""

from __future__ import annotations

from pathlib import Path

from storage.base import ArtifactStore, StoreError
from storage.local import LocalStore


def open_store(url: str) -> ArtifactStore:
    if url.startswith("s3://"):
        raise StoreError("the S3 backend is not available yet; use a local folder")
    if url.startswith("file://"):
        url = url[len("file://") :]
    return LocalStore(Path(url).expanduser().resolve())
