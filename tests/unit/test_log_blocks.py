"""Lines packed in LogBlocks (coordinator/store/logs.py): a batch of blocks is stored as the same lines sent
one LogLine each would be (resends cut, the quota cut at the same line with the same marker, later attempts
in their range), read back at any cursor, served as LogLines to a client that does not read blocks; and
what a hostile agent could send in blocks (counts its text does not have, gaps, both kinds in one batch,
seqs out of range, one huge block) is refused or cut to size."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dstack.coordinator.attempts import stored_seq, wire_job_id
from dstack.coordinator.model import LogAck, LogLine, LogStream
from dstack.coordinator.store import Store
from dstack.coordinator.store.logs import CHUNK_BYTES, is_blocks, lines_body, lines_of, quota_marker
from dstack.protos.v1 import agent_pb2, client_pb2, common_pb2

JOB = "job-1"
OUT = 1


def blocks_batch(job: str, blocks: list[tuple[int, list[str]]], time_ns: int = 7) -> agent_pb2.LogBatch:
    """A batch of blocks, each (first seq, its lines)."""
    msg = agent_pb2.LogBatch(job_id=job)
    for first, lines in blocks:
        msg.blocks.add(first_seq=first, count=len(lines), stream=OUT, time_ns=time_ns, text="\n".join(lines))
    return msg


def lines_batch(job: str, blocks: list[tuple[int, list[str]]], time_ns: int = 7) -> agent_pb2.LogBatch:
    """The same lines, one LogLine each (what an agent sends a coordinator that does not take blocks)."""
    msg = agent_pb2.LogBatch(job_id=job)
    for first, lines in blocks:
        for i, text in enumerate(lines):
            msg.lines.add(seq=first + i, stream=OUT, time_ns=time_ns, text=text)
    return msg


def rows(store: Store, job: str = JOB) -> list[tuple[int, int, int, str]]:
    return [(ln.seq, ln.stream, ln.time_ns, ln.text) for ln in store.all_logs(job)]


texts = st.text(alphabet=st.sampled_from(["a", "é", "€", "😀", " ", "\r", "\t"]), max_size=12)


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[list[tuple[int, list[str]]]], int]:
    """A job's lines as an agent sends them across reconnects: batches of blocks, some resending lines
    already sent (from an older position), and a quota (0: none)."""
    lines = draw(st.lists(texts, min_size=1, max_size=60))
    batches: list[list[tuple[int, list[str]]]] = []
    sent = 0  # lines sent so far
    while sent < len(lines):
        start = draw(st.integers(max(0, sent - 8), sent))  # a resend from an older position, or not
        end = draw(st.integers(start + 1, len(lines)))
        blocks, at = [], start
        while at < end:
            n = draw(st.integers(1, end - at))
            blocks.append((at + 1, lines[at : at + n]))
            at += n
        batches.append(blocks)
        sent = max(sent, end)
    quota = draw(st.sampled_from([0, 0, 5, 20, 40, 80]))
    return batches, quota


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, Store]]:
    """One store sent LogLines, one sent the same lines in blocks (a new job in both for each example)."""
    d = tmp_path_factory.mktemp("stores")
    as_lines, as_blocks = Store(d / "lines.db"), Store(d / "blocks.db")
    yield as_lines, as_blocks
    as_lines.close()
    as_blocks.close()


job_numbers = itertools.count()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deliveries(), st.integers(1, 2))
def test_blocks_are_stored_as_the_same_lines_one_by_one_would_be(
    two_stores: tuple[Store, Store], delivery: tuple[list[list[tuple[int, list[str]]]], int], attempt: int
) -> None:
    as_lines, as_blocks = two_stores
    batches, quota = delivery
    job = f"job-{next(job_numbers)}"
    wire = wire_job_id(job, attempt) if attempt > 1 else job
    as_lines.logs.max_bytes = as_blocks.logs.max_bytes = quota
    for b in batches:
        assert as_blocks.insert_logs([blocks_batch(wire, b)]) == as_lines.insert_logs([lines_batch(wire, b)])
    want = rows(as_lines, job)
    assert rows(as_blocks, job) == want
    assert as_blocks.log_positions([wire]) == as_lines.log_positions([wire])
    if quota:
        assert [r[3] for r in want].count(quota_marker(quota)) <= 1
    # Paged from every cursor, by small pages: every line after it, once, in order.
    seqs = [r[0] for r in want]
    for after in [0, *seqs]:
        got, cursor = [], after
        while (page := as_blocks.read_log_page(job, cursor, 3)) is not None:
            got += [(ln.seq, ln.stream, ln.time_ns, ln.text) for ln in page.lines()]
            cursor = page.last_seq
        assert got == [r for r in want if r[0] > after]


def test_a_batch_of_blocks_is_stored_as_sent_and_served_as_lines_to_a_client_that_does_not_read_blocks(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "c.db")
    try:
        msg = blocks_batch(JOB, [(1, ["one", "two"]), (3, ["three"])])
        assert store.insert_logs([msg]) == [LogAck(JOB, 3)]
        page = store.read_log_page(JOB, 0, 100)
        assert page is not None and is_blocks(page.body) and (page.count, page.last_seq) == (3, 3)
        # Stored as the agent serialized it, less its job id.
        head = agent_pb2.LogBatch(job_id=JOB).SerializeToString()
        assert page.body == msg.SerializeToString()[len(head) :]
        body, count, last = lines_body(page.body, 1 << 20)
        resp = client_pb2.JobLogs.FromString(body)
        assert [(ln.seq, ln.text) for ln in resp.lines] == [(1, "one"), (2, "two"), (3, "three")] and not resp.blocks
        assert (count, last) == (3, 3)
        # Within a byte budget (at least one line): the cursor is the last line that went.
        assert lines_body(page.body, 1)[1:] == (1, 1)
    finally:
        store.close()


def test_a_cursor_inside_a_block_gets_the_rest_of_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    try:
        store.insert_logs([blocks_batch(JOB, [(1, [f"l{i}" for i in range(1, 11)])])])
        page = store.read_log_page(JOB, 4, 100)
        assert page is not None and (page.count, page.last_seq) == (6, 10)
        blocks = client_pb2.JobLogs.FromString(page.body).blocks
        assert [(b.first_seq, b.count, b.text) for b in blocks] == [(5, 6, "l5\nl6\nl7\nl8\nl9\nl10")]
    finally:
        store.close()


def test_a_page_holds_one_kind_so_lines_of_an_old_agent_and_blocks_of_a_new_one_keep_their_order(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "c.db")
    try:
        store.insert_logs([lines_batch(JOB, [(1, ["a1", "a2"])])])  # attempt 1 on an agent sending LogLines
        store.insert_logs([blocks_batch(wire_job_id(JOB, 2), [(1, ["b1", "b2"])])])  # attempt 2: blocks
        store.insert_logs([lines_batch(JOB, [(3, ["a3"])])])
        first = store.read_log_page(JOB, 0, 100)
        assert first is not None and not is_blocks(first.body) and first.last_seq == 3
        second = store.read_log_page(JOB, first.last_seq, 100)
        assert second is not None and is_blocks(second.body)
        assert [ln.seq for ln in second.lines()] == [stored_seq(2, 1), stored_seq(2, 2)]
        assert store.read_log_page(JOB, second.last_seq, 100) is None
    finally:
        store.close()


def test_blocks_a_hostile_agent_forges_are_acknowledged_and_dropped(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    try:
        forged = [
            blocks_batch(JOB, [(1, ["a", "b"])]),  # made below to claim 5 lines for 2 texts
            blocks_batch(JOB, [(1, ["a"]), (5, ["b"])]),  # a gap between blocks
            blocks_batch(JOB, [(0, ["a"])]),  # seqs start at 1
            blocks_batch(JOB, [((1 << 32) - 1, ["a", "b"])]),  # past the attempt's range
        ]
        forged[0].blocks[0].count = 5
        zero = agent_pb2.LogBatch(job_id=JOB)
        zero.blocks.add(first_seq=1, count=0, text="")
        both = blocks_batch(JOB, [(1, ["a"])])
        both.lines.add(seq=2, stream=OUT, text="b")  # both kinds in one batch: their order is unknown
        for msg in [*forged, zero, both]:
            acks = store.insert_logs([msg])
            assert len(acks) == 1 and acks[0].job_id == JOB  # acknowledged: an agent does not resend it forever
        assert rows(store) == []
        assert store.insert_logs([blocks_batch(JOB, [(1, ["ok"])])]) == [LogAck(JOB, 1)]
        assert [r[3] for r in rows(store)] == ["ok"]
    finally:
        store.close()


def test_one_huge_block_is_stored_in_chunks_and_paged_within_the_byte_budget(tmp_path: Path) -> None:
    """A hostile agent's 3 MiB block (the coordinator accepts 64 MiB messages): chunks of at most about
    CHUNK_BYTES, so a page still fits one client response."""
    store = Store(tmp_path / "c.db")
    try:
        lines = [f"{i} " + "x" * 1000 for i in range(3000)]
        assert store.insert_logs([blocks_batch(JOB, [(1, lines)])]) == [LogAck(JOB, 3000)]
        sizes = [len(b) for (b,) in store.conn.execute("SELECT body FROM log_chunks ORDER BY first_seq")]
        assert len(sizes) >= 3 and max(sizes) <= CHUNK_BYTES
        got, cursor = [], 0
        while (page := store.read_log_page(JOB, cursor, 100_000, 3 << 20)) is not None:
            assert len(page.body) <= 3 << 20
            got += [ln.text for ln in page.lines()]
            cursor = page.last_seq
        assert got == lines
    finally:
        store.close()


def test_the_quota_marker_takes_the_place_of_the_first_line_past_it_inside_a_block(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    store.logs.max_bytes = 10
    try:
        # "€" is 3 bytes: 3 lines fit (9 bytes), the 4th would make 12.
        store.insert_logs([blocks_batch(JOB, [(1, ["€"] * 6)], time_ns=42)])
        store.insert_logs([blocks_batch(JOB, [(7, ["later"])])])
        marker = (4, int(LogStream.SYSTEM), 42, quota_marker(10))
        assert rows(store) == [(1, OUT, 42, "€"), (2, OUT, 42, "€"), (3, OUT, 42, "€"), marker]
    finally:
        store.close()


def test_lines_of_a_body_of_blocks_are_its_lines() -> None:
    msg = client_pb2.JobLogs()
    msg.blocks.add(first_seq=3, count=3, stream=common_pb2.LOG_STREAM_STDERR, time_ns=9, text="a\n\nc")

    assert lines_of(msg.SerializeToString()) == [
        LogLine(3, int(common_pb2.LOG_STREAM_STDERR), 9, "a"),
        LogLine(4, int(common_pb2.LOG_STREAM_STDERR), 9, ""),
        LogLine(5, int(common_pb2.LOG_STREAM_STDERR), 9, "c"),
    ]
