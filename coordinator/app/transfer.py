"""Moving bytes between async streams and the (blocking) object store, on worker threads."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import queue
from collections.abc import AsyncIterator, Iterator

from dstack.coordinator.errors import InvalidRequest
from dstack.storage import ArtifactStore, StoreError

CHUNK = 1 << 20


async def put_from_stream(
    store: ArtifactStore, key: str, chunks: AsyncIterator[bytes], expected_sha256: str = ""
) -> tuple[int, str]:
    """Streams async chunks into the (blocking) store on a worker thread; returns size and sha256.

    With `expected_sha256`, a mismatch aborts the write, so a corrupted object is never visible."""
    q: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=8)
    digest = hashlib.sha256()

    def gen() -> Iterator[bytes]:
        while (chunk := q.get()) is not None:
            if isinstance(chunk, BaseException):
                raise StoreError("the upload was interrupted") from chunk  # nothing is committed
            digest.update(chunk)
            yield chunk
        if expected_sha256 and digest.hexdigest() != expected_sha256:
            raise InvalidRequest(f"upload corrupted: expected sha256 {expected_sha256}, got {digest.hexdigest()}")

    writer = asyncio.get_running_loop().run_in_executor(None, store.put_stream, key, gen())

    async def feed(item: bytes | BaseException | None) -> bool:
        while not writer.done():
            try:
                q.put_nowait(item)
                return True
            except queue.Full:
                await asyncio.sleep(0.001)
        return False

    try:
        async for chunk in chunks:
            if not await feed(chunk):
                break
    except BaseException as e:  # the sender went away or cancelled: abort the write
        await asyncio.shield(feed(e))
        with contextlib.suppress(Exception):
            await writer
        raise
    await feed(None)
    size = await writer
    return size, digest.hexdigest()


async def read_chunks(store: ArtifactStore, key: str) -> AsyncIterator[bytes]:
    f = await asyncio.to_thread(store.open_read, key)
    try:
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            yield chunk
    finally:
        f.close()
