"""New runs' and jobs' ids come in the order they were made (coordinator/ids.py), so that filling a deep
queue appends to the right edge of the B-trees they key instead of dirtying a random page of each per run.

The cost pinned here is pages, not time: the frames a batch of submissions adds to the WAL (each is one
page the commit writes, and the checkpoint writes again into the database)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dstack.coordinator.ids import new_id
from dstack.coordinator.store.db import NewJob, Store


@contextmanager
def one_batch(store: Store) -> Iterator[None]:
    """What the DB thread does for a group-commit batch (store/executor.py): one transaction for many calls."""
    with store.tx():
        store.in_batch = True
        try:
            yield
        finally:
            store.in_batch = False


def submit(store: Store, runs: int) -> None:
    """`runs` single-job runs as a SubmitRuns call stores them (app/runs.py): the run, its job, two record parts."""
    with one_batch(store):
        for _ in range(runs):
            job = NewJob(job_name="j0", spec=b"\n\x01t" * 16, cpu=0.0, memory=0, gpu_count=0, depends_on=[])
            created = store.create_run("alice", "t", b"", "", [], [job])
            store.records.put(created.run_id, "", "submission", {"resolved_workflow": {}, "args": []})
            store.records.put(created.run_id, "", "specs", {"encoded": ["CgF0"]})


def wal_frames_then_empty(store: Store) -> int:
    frames = int(store.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return frames


def test_ids_are_32_hex_digits_unique_and_in_the_order_they_were_made() -> None:
    ids = [new_id() for _ in range(20_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    # Ordered by the millisecond they were made in (within one, the random part decides).
    assert [i[:12] for i in ids] == sorted(i[:12] for i in ids)


def test_a_run_submitted_into_a_deep_queue_writes_about_a_page_not_one_per_index(tmp_path: Path) -> None:
    """Random ids (uuid4, before) made a batch of 100 runs into a 2,000-deep queue write 197 WAL frames:
    about one page for each of the runs', jobs', jobs-by-run and records' B-trees per run. Ordered ids
    write 88 (the rest: the run names' index, whose names are random by design)."""
    store = Store(tmp_path / "coordinator.db")
    for _ in range(4):
        submit(store, 500)
    assert store.conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 2000
    wal_frames_then_empty(store)
    submit(store, 100)
    frames = wal_frames_then_empty(store)
    assert frames <= 130, f"100 runs into a 2,000-deep queue wrote {frames} WAL frames"
    made = [r[0][:12] for r in store.conn.execute("SELECT id FROM jobs ORDER BY rowid")]
    assert made == sorted(made)  # each job's id is of the millisecond it was stored in or a later one
