"""DbExecutor's group commit: calls that share a transaction are still isolated from each other's failures."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from dstack.coordinator.store import Store
from dstack.coordinator.store.executor import DbExecutor
from tests.inproc.factories import WAIT_S

pytestmark = pytest.mark.inproc


class Boom(Exception):
    pass


@contextmanager
def executor(tmp_path: Path) -> Iterator[tuple[Store, DbExecutor, list[int]]]:
    """A store, its executor, and the sizes of the batches it ran (to show calls shared one)."""
    store = Store(tmp_path / "db.sqlite")
    db = DbExecutor(store)
    sizes: list[int] = []
    run_batch = db._run_batch

    def counted(batch: list[Any]) -> Any:
        sizes.append(len(batch))
        return run_batch(batch)

    db._run_batch = counted  # type: ignore[method-assign]  # counting the batches means wrapping the method
    try:
        yield store, db, sizes
    finally:
        db.shutdown()
        store.close()


async def one_batch(db: DbExecutor, calls: list[Callable[[], Any]]) -> list[Any]:
    """Runs `calls` as one batch: the DB thread is held busy until every one of them is queued."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(WAIT_S)

    held = asyncio.ensure_future(db(hold))
    assert await asyncio.to_thread(entered.wait, WAIT_S)
    futures = [asyncio.ensure_future(db(c)) for c in calls]
    await asyncio.sleep(0)  # one turn of the loop: each call is now in the executor's queue
    release.set()
    await held
    return await asyncio.gather(*futures, return_exceptions=True)


async def test_a_failing_call_is_undone_alone_and_the_calls_around_it_in_its_batch_commit(tmp_path: Path) -> None:
    with executor(tmp_path) as (store, db, sizes):

        def fails_after_writing() -> None:
            store.ensure_user("mallory", "tok-m", "admin")
            raise Boom("after its write")

        results = await one_batch(
            db,
            [
                lambda: store.ensure_user("alice", "tok-a", "user"),
                fails_after_writing,
                lambda: store.ensure_user("bob", "tok-b", "user"),
            ],
        )
        assert sizes == [1, 3]  # the holder alone, then the three calls in one transaction
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], Boom)
        assert await db(store.user_for_token, "tok-a") == "alice"
        assert await db(store.user_for_token, "tok-b") == "bob"
        assert await db(store.user_for_token, "tok-m") is None  # its write went with it
        assert not store.conn.in_transaction


async def test_a_database_error_in_one_call_leaves_a_concurrent_call_on_the_same_rows_intact(tmp_path: Path) -> None:
    with executor(tmp_path) as (store, db, sizes):
        await db(store.ensure_user, "carol", "tok-c1", "user")

        def rename_then_violate() -> None:
            # Changes carol's token, then breaks a constraint: both must be undone.
            store.ensure_user("carol", "tok-c2", "user")
            store.conn.execute("INSERT INTO users (name) VALUES (NULL)")

        def read_carol() -> str | None:
            return store.user_for_token("tok-c1")

        results = await one_batch(db, [rename_then_violate, read_carol])
        assert sizes[-1] == 2
        assert isinstance(results[0], sqlite3.IntegrityError)
        assert results[1] == "carol"  # the later call in the batch saw none of the undone write
        assert await db(store.user_for_token, "tok-c2") is None
        # Later batches work as usual: the connection was left outside any transaction.
        await db(store.ensure_user, "dave", "tok-d", "user")
        assert await db(store.user_for_token, "tok-d") == "dave"
