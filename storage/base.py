"""The interface every artifact-store backend implements (a local folder, or S3)."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from dstack.storage.errors import InvalidKey, ObjectNotFound, StoreError

__all__ = ["ArtifactStore", "ObjectNotFound", "StoreError", "UploadGrant", "check_key"]


def check_key(key: str) -> str:
    """Refuses keys that could escape the store's namespace."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise InvalidKey(f"invalid object key {key!r}")
    return key


@dataclass(frozen=True)
class UploadGrant:
    """Where a client with no credentials sends one object: one presigned PUT, or (for big objects) a
    multipart upload whose parts each have a presigned PUT and which the store owner completes."""

    key: str
    url: str = ""
    upload_id: str = ""
    part_size: int = 0
    part_urls: tuple[str, ...] = ()


class ArtifactStore(abc.ABC):
    """Blocking API: callers run it in a worker thread, never on an event loop."""

    #: whether clients can be handed presigned URLs; if not, the coordinator streams the bytes itself
    presigns = False
    description = ""

    @abc.abstractmethod
    def put_stream(self, key: str, chunks: Iterator[bytes]) -> int:
        """Writes the object atomically (readers never see a partial object); returns its size."""

    @abc.abstractmethod
    def open_read(self, key: str) -> BinaryIO: ...

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list_prefix(self, prefix: str) -> dict[str, int]:
        """Every object under `prefix`, key -> size."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Deletes every object under `prefix`; returns how many."""

    def collect_temporaries(self, older_than_s: float) -> int:
        """Removes what uploads that never finished left behind (a crash mid-upload), once older than
        `older_than_s`; returns how many. Nothing by default."""
        return 0

    def check(self) -> None:  # noqa: B027 (optional hook, nothing to check by default)
        """Raises StoreError with an actionable message when the store cannot be used."""

    def put_bytes(self, key: str, data: bytes) -> int:
        return self.put_stream(key, iter([data]))

    def copy(self, src: str, dst: str) -> None:
        """Makes `dst` an object with `src`'s bytes (the step cache reuses a job's artifacts this way).
        By default the bytes pass through this process; a store that can do better (a link, a copy inside
        the store) overrides it. ObjectNotFound when `src` is missing."""
        with self.open_read(src) as f:
            self.put_stream(dst, iter(lambda: f.read(1 << 20), b""))

    def read_bytes(self, key: str) -> bytes:
        with self.open_read(key) as f:
            return f.read()

    # Presigning: only stores with `presigns = True` implement these.
    def presign_get(self, key: str, expires_s: int) -> str:
        raise StoreError(f"{type(self).__name__} cannot presign")

    def grant_upload(self, key: str, size: int, expires_s: int) -> UploadGrant:
        raise StoreError(f"{type(self).__name__} cannot presign")

    def complete_upload(self, key: str, upload_id: str, etags: Sequence[str]) -> None:
        raise StoreError(f"{type(self).__name__} cannot presign")

    def abort_upload(self, key: str, upload_id: str) -> None:  # noqa: B027 (nothing to abort by default)
        """Abandons an unfinished multipart upload (best effort)."""
