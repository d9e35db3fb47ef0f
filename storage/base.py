"""The interface every artifact-store backend implements (local folder now, S3 next)."""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import BinaryIO


class StoreError(Exception):
    """The store failed or is unreachable."""


class ObjectNotFound(StoreError):
    def __init__(self, key: str) -> None:
        super().__init__(f"object {key!r} is not in the store")
        self.key = key


def check_key(key: str) -> str:
    """Refuses keys that could escape the store's namespace."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"invalid object key {key!r}")
    return key


class ArtifactStore(abc.ABC):
    """Blocking API: callers run it in a worker thread, never on an event loop."""

    @abc.abstractmethod
    def put_stream(self, key: str, chunks: Iterator[bytes]) -> int:
        """Writes the object atomically (readers never see a partial object); returns its size."""

    @abc.abstractmethod
    def open_read(self, key: str) -> BinaryIO: ...

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None: ...

    def put_bytes(self, key: str, data: bytes) -> int:
        return self.put_stream(key, iter([data]))

    def read_bytes(self, key: str) -> bytes:
        with self.open_read(key) as f:
            return f.read()
