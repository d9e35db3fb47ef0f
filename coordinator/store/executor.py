"""Runs blocking store calls on one dedicated thread, so the event loop never waits on disk.

Group commit: the thread takes every call that is queued, runs them in one transaction (each in
its own savepoint, so one call's error undoes only that call) and commits once. Under load many
small writes share one commit; with no load a call is a transaction of its own. Results go back
to the event loop in one wake-up per batch.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from dstack.coordinator.store.db import Store

P = ParamSpec("P")
T = TypeVar("T")
MAX_BATCH = 512

_Item = tuple[Callable[[], Any], asyncio.Future[Any]]


class DbExecutor:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Calls that failed with a database error (a full disk, a locked or corrupt file): /metrics counts
        # them. Written by the DB thread only.
        self.sqlite_errors = 0
        self._thread = threading.Thread(target=self._work, name="db", daemon=True)
        self._thread.start()

    async def __call__(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.submit(fn, *args, **kwargs)

    def submit(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
        """Queues the call now and returns its future: calls queued one after another without an await
        between them run in this order, most often in one batch (one commit, one wake-up)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((functools.partial(fn, *args, **kwargs), fut))
        return fut

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(item)
            results = self._run_batch(batch)
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, results)

    def _run_batch(self, batch: list[_Item]) -> list[tuple[asyncio.Future[Any], bool, Any]]:
        results: list[tuple[asyncio.Future[Any], bool, Any]] = []
        conn = self.store.conn
        try:
            with self.store.tx():
                self.store.in_batch = True
                for fn, fut in batch:
                    conn.execute("SAVEPOINT call")
                    try:
                        value = fn()
                        conn.execute("RELEASE call")
                        results.append((fut, True, value))
                    except Exception as e:
                        if isinstance(e, sqlite3.Error):
                            self.sqlite_errors += 1
                        conn.execute("ROLLBACK TO call")
                        conn.execute("RELEASE call")
                        results.append((fut, False, e))
        except Exception as e:  # the commit itself failed: every call in the batch failed
            if isinstance(e, sqlite3.Error):
                self.sqlite_errors += len(batch)
            results = [(fut, False, e) for _, fut in batch]
            self.store.rolled_back()
        finally:
            self.store.in_batch = False
        return results

    def shutdown(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)


def _resolve(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in results:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
