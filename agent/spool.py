"""One job's log lines beyond the outbox's memory bound, on disk, first in first out.

Records are length-prefixed serialized messages (the outbox's `LogBlock`s; `LogLine`s by default) in
segment files (`00000001.log`, ...) of a bounded size; a segment is deleted as soon as it has been read
back, so the disk holds only lines still owed to the coordinator. Blocking file I/O: the outbox calls
these methods through `asyncio.to_thread`, one call at a time per spool.
"""

from __future__ import annotations

import shutil
import struct
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Generic, TypeVar

from google.protobuf.message import Message

from dstack.protos.v1 import common_pb2

SEGMENT_BYTES = 4 << 20
_LEN = struct.Struct("<I")
R = TypeVar("R", bound=Message)


class Spool(Generic[R]):
    def __init__(
        self,
        folder: Path,
        segment_bytes: int = SEGMENT_BYTES,
        parse: Callable[[bytes], R] = common_pb2.LogLine.FromString,  # type: ignore[assignment]
    ) -> None:
        self.folder = folder
        self.parse = parse
        self.segment_bytes = segment_bytes
        self._segments: deque[Path] = deque()  # oldest first; the last one is written to
        self._next = 1
        self._writer: BinaryIO | None = None
        self._written = 0  # bytes in the segment being written
        self._reader: BinaryIO | None = None  # on self._segments[0]

    def append(self, lines: list[R]) -> None:
        if not lines:
            return
        if self._writer is None or self._written >= self.segment_bytes:
            self._start_segment()
        assert self._writer is not None
        data = b"".join(_LEN.pack(len(b)) + b for b in (ln.SerializeToString() for ln in lines))
        try:
            self._writer.write(data)
            self._writer.flush()  # the reader has its own handle
        except OSError:
            # A full disk may have taken part of the batch: cut it off, so no reader sees half a record
            # (the caller keeps the whole batch and tries again later).
            self._writer = _reopen_at(self._writer, self._written)
            raise
        self._written += len(data)

    def read(self, max_bytes: int, size: Callable[[R], int] | None = None) -> list[R]:
        """Up to about `max_bytes` of the oldest records (at least one when any is left), removed from the spool;
        a record counts as its serialized size, or as `size` says."""
        out: list[R] = []
        budget = max_bytes
        while self._segments and (budget > 0 or not out):
            if self._reader is None:
                self._reader = open(self._segments[0], "rb")  # kept open across calls
            head = self._reader.read(_LEN.size)
            if len(head) == _LEN.size:
                (n,) = _LEN.unpack(head)
                record = self.parse(self._reader.read(n))
                out.append(record)
                budget -= n if size is None else size(record)
                continue
            # The end of this segment: the writer has moved on (it is done), or the reader caught up with it.
            self._reader.close()
            self._reader = None
            done = self._segments.popleft()
            if not self._segments and self._writer is not None:
                self._writer.close()
                self._writer = None
            done.unlink(missing_ok=True)
        return out

    def remove(self) -> None:
        for f in (self._reader, self._writer):
            if f is not None:
                f.close()
        self._reader = self._writer = None
        self._segments.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _start_segment(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.folder / f"{self._next:08d}.log"
        self._next += 1
        self._writer = open(path, "ab")  # kept open across calls
        self._written = 0
        self._segments.append(path)


def _reopen_at(writer: BinaryIO, size: int) -> BinaryIO:
    """The segment cut back to `size` bytes, with a fresh handle (the old one's buffer holds the failed write)."""
    path = writer.name
    try:
        writer.close()
    except OSError:
        pass  # the close flushes the failed write again
    with open(path, "r+b") as f:
        f.truncate(size)
    return open(path, "ab")  # kept open across calls
