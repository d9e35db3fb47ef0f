"""Local-folder backend: the embedded default, and a team server with a shared disk."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from dstack.storage.base import ArtifactStore, check_key
from dstack.storage.errors import AccessDenied, NoSuchBucket, ObjectNotFound, StoreError, StoreUnavailable


class LocalStore(ArtifactStore):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = str(root)
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """OSErrors as the store's error types (storage/errors.py), so callers decide on type alone."""
        try:
            yield
        except StoreError:
            raise
        except PermissionError as e:
            raise AccessDenied(
                f"{what}: permission denied on {e.filename or self.root}: the store folder "
                "must be writable by the coordinator's user"
            ) from e
        except FileNotFoundError as e:
            if not self.root.is_dir():
                raise NoSuchBucket(f"{what}: the store folder {self.root} does not exist any more") from e
            raise StoreUnavailable(f"{what}: {e}") from e  # a concurrent delete of the same prefix: passes
        except OSError as e:  # a full or failing disk: it may pass (space freed, disk back)
            raise StoreUnavailable(f"{what}: {e.strerror or e} on {self.root}") from e

    def put_stream(self, key: str, chunks: Iterator[bytes]) -> int:
        with self._errors(f"put {key}"):
            return self._put_stream(key, chunks)

    def _put_stream(self, key: str, chunks: Iterator[bytes]) -> int:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                    size += len(chunk)
            os.replace(tmp, dest)  # atomic: a reader sees the old object or the whole new one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return size

    def copy(self, src: str, dst: str) -> None:
        """A hard link: no bytes are copied, and deleting either name leaves the other whole (objects are
        never written in place: put_stream replaces the name). A file system without links copies."""
        source, dest = self._path(src), self._path(dst)
        if not source.is_file():
            raise ObjectNotFound(src)
        with self._errors(f"copy {src} to {dst}"):
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.parent / f".tmp-link-{os.getpid()}-{time.monotonic_ns()}"
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)
            os.replace(tmp, dest)

    def collect_temporaries(self, older_than_s: float) -> int:
        """`.tmp-*` files of writes that never finished (put_stream removes its own unless the process died)."""
        with self._errors("collect temporaries"):
            cutoff = time.time() - older_than_s
            removed = 0
            for dirpath, _dirs, files in os.walk(self.root):
                for name in files:
                    if not name.startswith(".tmp-"):
                        continue
                    p = Path(dirpath) / name
                    with contextlib.suppress(FileNotFoundError):  # finished (renamed) or removed meanwhile
                        if p.stat().st_mtime < cutoff:
                            p.unlink()
                            removed += 1
            return removed

    def open_read(self, key: str) -> BinaryIO:
        try:
            return self._path(key).open("rb")
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        except OSError as e:
            with self._errors(f"get {key}"):
                raise e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_prefix(self, prefix: str) -> dict[str, int]:
        with self._errors(f"list {prefix}"):
            return self._list_prefix(prefix)

    def _list_prefix(self, prefix: str) -> dict[str, int]:
        base = self._path(prefix.rstrip("/"))
        if base.is_file():
            return {prefix.rstrip("/"): base.stat().st_size}
        out = {}
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if not name.startswith(".tmp-"):
                    p = Path(dirpath) / name
                    out[p.relative_to(self.root).as_posix()] = p.stat().st_size
        return out

    def delete_prefix(self, prefix: str) -> int:
        with self._errors(f"delete {prefix}"):
            return self._delete_prefix(prefix)

    def _delete_prefix(self, prefix: str) -> int:
        base = self._path(prefix.rstrip("/"))
        if base.is_file():
            base.unlink()
            return 1
        count = sum(len(files) for _, _, files in os.walk(base))
        shutil.rmtree(base, ignore_errors=True)
        return count
