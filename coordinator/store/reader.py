"""Read-only store calls on their own connections and threads, so that listings never queue behind writes.

The DbExecutor's one thread runs every write and every scheduling pass; at 100,000 queued jobs a pass
holds it for seconds, and `dstack ps` (ListRuns), GetRun, `dstack agents`, log reads and the HTTP API's
GETs waited behind it. Here each of READERS threads owns a read-only connection to the same WAL database
(`Store(read_only=True)`) and takes calls from one queue; each call runs in one read transaction, so the
statements of one call see one snapshot.

Consistency: a write's caller is answered only after the writer's commit, and a read transaction sees
every commit made before it began: a client that submitted a run (and got its answer) finds it in the
very next listing (read-your-writes). What a reader cannot see is the engine's memory beyond what it is
handed (waiting reasons, positions: read as the call runs, as before).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from dstack.coordinator.store.db import Store

P = ParamSpec("P")
T = TypeVar("T")
READERS = 2  # threads (and connections): one listing need not wait for another's long page

_Item = tuple[Callable[[Store], Any], asyncio.AbstractEventLoop, asyncio.Future[Any]]


class ReadExecutor:
    """`await reads(fn, *args)` runs `fn(store, *args)` on a reader thread, `store` being a read-only Store."""

    def __init__(self, path: Path, clock: Callable[[], int] = time.time_ns, threads: int = READERS) -> None:
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._stores = [Store(path, clock, read_only=True) for _ in range(threads)]
        self._threads = [
            threading.Thread(target=self._work, args=(s,), name=f"db-read-{i}", daemon=True)
            for i, s in enumerate(self._stores)
        ]
        for t in self._threads:
            t.start()

    async def __call__(self, fn: Callable[Concatenate[Store, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((_bind(fn, args, kwargs), loop, fut))
        return await fut

    def _work(self, store: Store) -> None:
        conn = store.conn
        while (item := self._queue.get()) is not None:
            fn, loop, fut = item
            try:
                conn.execute("BEGIN")  # one snapshot for every statement of the call
                try:
                    value = fn(store)
                finally:
                    conn.execute("COMMIT")
                ok, result = True, value
            except Exception as e:
                ok, result = False, e
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, fut, ok, result)
        store.close()

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=10)


def _bind(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[Store], Any]:
    return lambda store: fn(store, *args, **kwargs)


def _resolve(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)
