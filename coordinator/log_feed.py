"""Log followers of runs: woken when something about their run changed, and handed its stored chunks.

A follower that has read all its run's lines in the store (`dstack logs -f`, caught up) would otherwise
read each new chunk back from the store on a reader thread: one more hop between threads per agent batch
(0.8-3 ms on a loaded 2-core host, at hundreds of batches a second). Instead, once a batch's transaction
is committed, the engine hands the chunks it wrote to every follower of their run (`RunWatchers.stored`),
and a caught-up follower sends them on as they are (coordinator/app/logs.py decides what it may take:
only the chunk that follows its cursor; anything else, it reads from the store).

Each follower keeps at most `max_bytes` of chunks (the bodies are shared by all followers of the run, but
each is bounded alone): one that does not take them in time (its client reads slowly) drops what it holds
and reads from the store again, from its cursor, like a follower that was never caught up. Any other
change to the run (an update, its end, an archive) makes it read the store too: the hand-off carries new
lines and nothing else. Nothing is lost by dropping: every chunk handed here is committed first, so the
store read that follows has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Iterator, Sequence

from dstack.coordinator.store.logs import StoredChunk

# A follower's chunks not yet taken. A caught-up follower takes them at each wake-up, a few ms of a job's
# output (about 100 KiB at 200,000 lines/s); beyond this it is not keeping up, and reads from the store.
FOLLOWER_BUFFER_BYTES = 2 << 20


class Follower:
    """One follower's wake-up and hand-off buffer. `reread`: it must read the store before it takes
    chunks again (it has not read it yet, its buffer overflowed, or something else about the run changed)."""

    def __init__(self, max_bytes: int = FOLLOWER_BUFFER_BYTES) -> None:
        self.max_bytes = max_bytes
        self._chunks: list[StoredChunk] = []
        self._bytes = 0
        self._reread = True
        self._wake = asyncio.Event()

    def offer(self, chunks: Sequence[StoredChunk]) -> bool:
        """Keeps committed chunks of the run for the follower; False when that overflowed its buffer (it
        holds none then, and reads the store)."""
        self._wake.set()
        if self._reread:
            return True  # its next read of the store, after these were committed, has them
        size = sum(len(c.body) for c in chunks)
        if self._chunks and self._bytes + size > self.max_bytes:
            self.changed()
            return False
        self._chunks.extend(chunks)
        self._bytes += size
        return True

    def changed(self) -> None:
        """Something about the run changed that chunks do not carry: read the store."""
        self._reread = True
        self._chunks = []
        self._bytes = 0
        self._wake.set()

    def take(self) -> tuple[list[StoredChunk], bool]:
        """The chunks handed since the last take, and whether the store must be read first (then the
        chunks are of no use: that read, made after this take, holds them). Call it before each read of
        the store, so that what comes after that read is what the next take returns."""
        chunks, reread = self._chunks, self._reread
        self._chunks, self._bytes, self._reread = [], 0, False
        self._wake.clear()
        return chunks, reread

    async def wait_or_recheck(self, recheck_s: float) -> None:
        """Until chunks or a change come; after `recheck_s` without any, the store is read anyway (in case
        a change came some other way)."""
        if self._chunks or self._reread:
            return
        try:
            # Not wait_for: on Python 3.11 it returns when the event is set just as the follower is cancelled,
            # swallowing the cancel (the stream would then poll on, holding its place, after its client left).
            async with asyncio.timeout(recheck_s):
                await self._wake.wait()
        except TimeoutError:
            self._reread = True


class RunWatchers:
    """The followers of each run (a weak set: a follower whose stream was dropped without its `finally`
    having run yet holds nothing here)."""

    def __init__(self, max_bytes: int = FOLLOWER_BUFFER_BYTES) -> None:
        self.max_bytes = max_bytes  # each follower's buffer (dstack server --log-follow-buffer)
        self._followers: dict[str, weakref.WeakSet[Follower]] = {}

    @contextlib.contextmanager
    def follow(self, run_id: str) -> Iterator[Follower]:
        f = Follower(self.max_bytes)
        self._followers.setdefault(run_id, weakref.WeakSet()).add(f)
        try:
            yield f
        finally:
            followers = self._followers.get(run_id)
            if followers is not None:
                followers.discard(f)
                if not followers:
                    del self._followers[run_id]

    def notify(self, run_ids: Sequence[str] | set[str]) -> None:
        for run_id in run_ids:
            for f in self._followers.get(run_id, ()):
                f.changed()

    def notify_all(self) -> None:
        self.notify(list(self._followers))

    def stored(self, run_id: str, chunks: Sequence[StoredChunk]) -> int:
        """Committed chunks of the run, handed to its followers; how many followers overflowed."""
        overflowed = 0
        for f in self._followers.get(run_id, ()):
            overflowed += not f.offer(chunks)
        return overflowed

    def followers(self, run_id: str) -> int:
        return len(self._followers.get(run_id, ()))
