"""The connection every repository of the store shares, its transaction helper and small SQL helpers.

The store is blocking by design: the coordinator calls it from one dedicated thread
(`coordinator.store.executor.DbExecutor`), never from the event loop.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator, Sequence, Sized
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

from dstack.coordinator.model import TerminationReason, termination_reason
from dstack.coordinator.store.schema import migrate
from dstack.storage.private import private_file, tighten_file

log = logging.getLogger(__name__)

Params = dict[str, Any] | Sequence[Any]


class Db:
    def __init__(self, path: Path, clock: Callable[[], int] = time.time_ns, *, read_only: bool = False) -> None:
        if read_only:
            self._open_reader(path, clock)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # The database holds tokens' hashes, runs and logs: 0600 from its first byte. SQLite creates
        # its -wal and -shm files with the database's mode; ones an older version made are tightened.
        private_file(path, log)
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        for suffix in ("-wal", "-shm"):
            tighten_file(path.with_name(path.name + suffix), log)
        # NORMAL in WAL mode: a power loss may drop the last commits, never corrupt the file.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        # The writer's statement journals in memory, not in temp files: every DB-thread call runs in a
        # savepoint of its group-commit batch (store/executor.py), so the original of each page a batch
        # changes is kept until the batch ends, and past 64 KiB SQLite spills that to a temp file: file
        # writes for every page a report batch touches (measured: ~20% of the DB thread's CPU per drained
        # job). What it holds is bounded by the pages one batch changes, as the WAL's growth is.
        conn.execute("PRAGMA temp_store=MEMORY")
        self.db = sqlite_utils.Database(conn)
        self.conn = conn
        self.clock = clock
        self.in_batch = False
        migrate(self.db)

    def _open_reader(self, path: Path, clock: Callable[[], int]) -> None:
        """A second connection to a database the writer opened (and migrated): reads only (query_only
        makes a write an error rather than a lock taken behind the writer's back). WAL mode is the
        file's: a reader sees every transaction committed before its own read transaction began, and
        never waits for the writer (coordinator/store/reader.py)."""
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA query_only=ON")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        self.db = sqlite_utils.Database(conn)
        self.conn = conn
        self.clock = clock
        self.in_batch = False

    def rolled_back(self) -> None:
        """A group-commit batch failed to commit: whatever a repository keeps in memory beside the database
        may be ahead of it (Store drops such caches)."""

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A transaction; inside a group-commit batch (DbExecutor) the batch's transaction is used."""
        if self.in_batch:
            yield self.conn
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def rows(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        return rows(self.conn, sql, params)

    def row(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        found = self.rows(sql, params)
        return found[0] if found else None


def rows(c: sqlite3.Connection, sql: str, params: Params = ()) -> list[sqlite3.Row]:
    """Rows addressed by column name. Set on the cursor, not the connection, so that callers
    reading plain tuples from `conn` (tests, migrations) still get tuples."""
    cur = c.execute(sql, params)
    cur.row_factory = sqlite3.Row
    return list(cur.fetchall())


def ints_in(values: Collection[int]) -> str:
    """An `IN (...)` list of integers (statuses), inlined: they are ours, never user input."""
    if isinstance(values, frozenset):  # the status sets (model.py, lifecycle): built once each, not per statement
        return _ints_of(values)
    return ",".join(str(int(v)) for v in sorted(values))


@functools.lru_cache(maxsize=256)
def _ints_of(values: frozenset[int]) -> str:
    return ",".join(str(int(v)) for v in sorted(values))


def marks(values: Sized) -> str:
    """`?, ...` for each value (a report batch's statements ask for it per message: built once per length)."""
    return _marks(len(values))


@functools.lru_cache(maxsize=1024)
def _marks(n: int) -> str:
    return ",".join("?" * n)


_REASONS = {int(r): r for r in TerminationReason}


def stored_reason(value: int | None) -> TerminationReason:
    """`model.termination_reason` of a stored value, by a dict lookup (an enum's call costs microseconds, and
    GetRun and listings read one per run and per job)."""
    reason = _REASONS.get(value) if value is not None else TerminationReason.UNSPECIFIED
    return reason if reason is not None else termination_reason(value)


def json_list(text: str | None) -> list[Any]:
    if not text or text == "[]":  # most stored lists are empty: no decoder for them (GetRun reads four per job)
        return []
    return list(json.loads(text))
