"""Chunked log storage (coordinator/store/logs.py): one row per agent batch, paged by line cursor at any
seq (inside a chunk too), resends cut at the last stored line, the quota cut inside a chunk at the same
line as line-by-line storage cut it, and a database made before chunks keeps its lines."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlite_utils

from dstack.coordinator.attempts import stored_seq, wire_job_id
from dstack.coordinator.model import LogAck, LogBatch, LogLine, LogStream
from dstack.coordinator.store import Store
from dstack.coordinator.store.logs import CHUNK_BYTES, quota_marker
from dstack.coordinator.store.schema import MIGRATIONS
from dstack.protos.v1 import agent_pb2, client_pb2

JOB = "job-1"


def batch(first: int, last: int, job: str = JOB, text: str = "line {}") -> LogBatch:
    return LogBatch(job, [LogLine(s, 1, s * 10, text.format(s)) for s in range(first, last + 1)])


def seqs(store: Store, job: str = JOB, after: int = 0, limit: int = 1_000_000) -> list[int]:
    return [ln.seq for ln in store.read_logs(job, after, limit)]


def chunk_rows(store: Store) -> list[tuple[int, int]]:
    return store.conn.execute("SELECT first_seq, last_seq FROM log_chunks ORDER BY first_seq").fetchall()


def test_one_row_per_batch_and_a_cursor_anywhere_pages_every_line_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    try:
        for first in range(1, 100, 10):
            store.insert_logs([batch(first, first + 9)])
        assert len(chunk_rows(store)) == 10
        # Every cursor: at a chunk's start, inside, at its end, past the last line.
        for after in range(0, 102):
            assert seqs(store, after=after) == list(range(after + 1, 101))
        # Paged by a small limit from a cursor inside a chunk: whole chunks after the first, none repeated.
        page = store.read_log_page(JOB, 15, 1)
        assert page is not None and (page.count, page.last_seq) == (5, 20)
        assert [ln.seq for ln in page.lines()] == [16, 17, 18, 19, 20]
        after, got = 0, []
        while (p := store.read_log_page(JOB, after, 7)) is not None:
            got += [ln.seq for ln in p.lines()]
            after = p.last_seq
        assert got == list(range(1, 101))
        assert store.read_log_page(JOB, 100, 10) is None
        # The body is what a client's JobLogs carries: it merges into a response as it is.
        resp = client_pb2.JobLogs(job_name="train")
        resp.MergeFromString(page.body)
        assert (resp.job_name, [ln.text for ln in resp.lines][:2]) == ("train", ["line 16", "line 17"])
    finally:
        store.close()


def test_a_resent_overlapping_batch_stores_only_its_new_lines(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    try:
        assert store.insert_logs([batch(1, 10)]) == [LogAck(JOB, 10)]
        # After a reconnect the agent resends from an older position: 6..15 overlaps 6..10.
        assert store.insert_logs([batch(6, 15)]) == [LogAck(JOB, 15)]
        assert store.insert_logs([batch(1, 15)]) == [LogAck(JOB, 15)]  # wholly a resend: acknowledged, not stored
        assert seqs(store) == list(range(1, 16))
        assert chunk_rows(store) == [(1, 10), (11, 15)]
        assert store.log_positions([JOB]) == {JOB: 15}
    finally:
        store.close()
    # After a restart the position comes from the database.
    again = Store(tmp_path / "c.db")
    try:
        again.insert_logs([batch(12, 20)])
        assert seqs(again) == list(range(1, 21))
    finally:
        again.close()


def test_proto_batches_of_later_attempts_are_stored_in_their_range(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    try:
        wire2 = wire_job_id(JOB, 2)
        msg = agent_pb2.LogBatch(job_id=JOB)
        for s in (1, 2, 3):
            msg.lines.add(seq=s, stream=1, text=f"a1 {s}", time_ns=s)
        store.insert_logs([msg])
        msg2 = agent_pb2.LogBatch(job_id=wire2)
        for s in (1, 2):
            msg2.lines.add(seq=s, stream=1, text=f"a2 {s}", time_ns=s)
        assert store.insert_logs([msg2]) == [LogAck(wire2, 2)]
        assert seqs(store) == [1, 2, 3, stored_seq(2, 1), stored_seq(2, 2)]
        assert store.log_positions([JOB, wire2]) == {JOB: 3, wire2: 2}
        assert [ln.text for ln in store.read_logs(JOB, 3, 10)] == ["a2 1", "a2 2"]
        # The incoming message is not changed (the engine reads its job ids afterwards).
        assert [ln.seq for ln in msg2.lines] == [1, 2] and msg2.job_id == wire2
    finally:
        store.close()


def test_a_batch_that_is_not_consecutive_is_acknowledged_and_dropped(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    try:
        forged = LogBatch(JOB, [LogLine(5, 1, 0, "a"), LogLine(3, 1, 0, "b"), LogLine(9, 1, 0, "c")])
        assert store.insert_logs([forged]) == [LogAck(JOB, 9)]
        assert seqs(store) == []
        store.insert_logs([batch(1, 3)])
        assert seqs(store) == [1, 2, 3]
    finally:
        store.close()


def test_the_quota_cuts_inside_a_chunk_at_the_first_line_past_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    store.logs.max_bytes = 100  # "line N" is 6 or 7 bytes: lines 1..9 are 54 bytes, 10..16 add 7 each
    try:
        store.insert_logs([batch(1, 9)])
        store.insert_logs([batch(10, 30)])  # crosses the quota inside: 54 + 6 * 7 = 96, line 16 would be 103
        store.insert_logs([batch(31, 40)])
        lines = store.read_logs(JOB, 0, 1000)
        assert [ln.seq for ln in lines] == list(range(1, 17))
        assert lines[-1] == LogLine(16, int(LogStream.SYSTEM), 160, quota_marker(100))
        assert sum(len(ln.text) for ln in lines[:-1]) == 96
        # From a cursor inside the cut chunk.
        assert [ln.seq for ln in store.read_logs(JOB, 12, 1000)] == [13, 14, 15, 16]
    finally:
        store.close()
    again = Store(tmp_path / "c.db")
    again.logs.max_bytes = 100
    try:
        again.insert_logs([batch(41, 50)])
        texts = [ln.text for ln in again.read_logs(JOB, 0, 1000)]
        assert texts.count(quota_marker(100)) == 1 and len(texts) == 16
    finally:
        again.close()


def test_a_resent_batch_that_crosses_the_quota_is_cut_after_the_stored_lines(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    store.logs.max_bytes = 100
    try:
        store.insert_logs([batch(1, 9)])  # 54 bytes
        store.insert_logs([batch(5, 30)])  # 5..9 resent, then 10..15 fit (96 bytes), 16 is past the quota
        lines = store.read_logs(JOB, 0, 1000)
        assert [ln.seq for ln in lines] == list(range(1, 17))
        assert [ln.text for ln in lines[8:]] == [f"line {s}" for s in range(9, 16)] + [quota_marker(100)]
        assert chunk_rows(store) == [(1, 9), (10, 16)]
    finally:
        store.close()


def test_a_database_made_before_chunks_keeps_its_lines(tmp_path: Path) -> None:
    """The schema as main's code left it (every migration before chunks), with line rows in `logs`,
    opened by this code: every line readable in order, positions and the quota marker kept."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(str(path), isolation_level=None)
    db = sqlite_utils.Database(conn)
    for version, step in enumerate(MIGRATIONS[:-1], start=1):
        step(db)
        db.execute(f"PRAGMA user_version = {version:d}")
    marker = quota_marker(1000)
    rows = [("a", s, 1, s, f"a {s}") for s in range(1, 12_001)]  # more than one chunk
    rows += [("b", s, 1, s, f"b {s}") for s in (1, 2, 3)]
    rows += [("b", stored_seq(2, s), 2, s, f"b2 {s}") for s in (1, 2)]  # a second attempt
    rows += [("c", 1, 1, 1, "c 1"), ("c", 2, int(LogStream.SYSTEM), 2, marker)]
    with conn:  # one transaction, not one per row
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO logs (job_id, seq, stream, time_ns, text) VALUES (?, ?, ?, ?, ?)", rows)
    conn.close()

    store = Store(path)
    store.logs.max_bytes = 1 << 20  # the marker stored for c, not the bytes, stops c's lines
    try:
        assert not store.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'logs'").fetchone()
        assert [ln.text for ln in store.all_logs("a")] == [f"a {s}" for s in range(1, 12_001)]
        assert [ln.seq for ln in store.read_logs("a", 4999, 3)][:3] == [5000, 5001, 5002]
        assert [(ln.seq, ln.stream, ln.text) for ln in store.all_logs("b")] == [
            (1, 1, "b 1"),
            (2, 1, "b 2"),
            (3, 1, "b 3"),
            (stored_seq(2, 1), 2, "b2 1"),
            (stored_seq(2, 2), 2, "b2 2"),
        ]
        assert store.log_positions(["a", "b", wire_job_id("b", 2)]) == {"a": 12_000, "b": 3, "b-a2": 2}
        store.insert_logs([batch(12_001, 12_002, job="a")])
        assert store.all_logs("a")[-1].text == "line 12002"
        store.insert_logs([batch(3, 4, job="c")])  # the marker is stored: nothing more for c
        assert [ln.text for ln in store.all_logs("c")] == ["c 1", marker]
    finally:
        store.close()


def test_a_batch_bigger_than_an_agent_sends_is_split_and_a_page_fits_a_default_grpc_message(tmp_path: Path) -> None:
    """A hostile agent's 3 MiB batch (the coordinator accepts 64 MiB messages) becomes chunks of at most
    CHUNK_BYTES; a page of whole chunks stays within its byte budget, so a response fits gRPC's 4 MiB."""
    store = Store(tmp_path / "c.db")
    try:
        text = "{} " + "x" * 1000
        acks = store.insert_logs([batch(1, 3000, text=text)])
        assert acks == [LogAck(JOB, 3000)]
        rows = store.conn.execute("SELECT first_seq, last_seq, length(body) FROM log_chunks ORDER BY 1").fetchall()
        assert len(rows) == 3 and all(size <= CHUNK_BYTES for _, _, size in rows)
        assert [(f, la) for f, la, _ in rows] == [(1, rows[0][1]), (rows[0][1] + 1, rows[1][1]), (rows[1][1] + 1, 3000)]
        assert seqs(store) == list(range(1, 3001))
        budget = CHUNK_BYTES * 3 // 2  # room for one whole chunk, not two
        after, pages = 0, 0
        while (p := store.read_log_page(JOB, after, 1_000_000, budget)) is not None:
            assert len(p.body) <= budget
            after, pages = p.last_seq, pages + 1
        assert (after, pages) == (3000, 3)
    finally:
        store.close()
