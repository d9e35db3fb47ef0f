"""The agent's outbox keeping lines in blocks (one per read of the job's output) and sending them as
LogBlocks to a coordinator that takes them, LogLines to one that does not: whatever the reads, batch
bounds, lost acknowledgements, reconnects at any position (switching kind) and spooling, the coordinator
gets every line once, in order, with consecutive seqs; batches and memory stay within their bounds."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dstack.agent.outbox import LINE_OVERHEAD, Outbox, OutboxBounds
from dstack.agent.runner import LineSplitter
from dstack.protos.v1 import agent_pb2, common_pb2

OUT = common_pb2.LOG_STREAM_STDOUT
ERR = common_pb2.LOG_STREAM_STDERR


def batch_lines(b: agent_pb2.LogBatch) -> list[tuple[int, int, str]]:
    """(seq, stream, text) of each line a batch carries, of either kind."""
    out = [(ln.seq, int(ln.stream), ln.text) for ln in b.lines]
    for k in b.blocks:
        texts = k.text.split("\n")
        assert len(texts) == k.count
        out += [(k.first_seq + i, int(k.stream), t) for i, t in enumerate(texts)]
    return out


class Coordinator:
    """Stores what it receives as the store does: lines after its position, which must follow it."""

    def __init__(self) -> None:
        self.stored: dict[str, list[tuple[int, int, str]]] = {}

    def receive(self, msg: agent_pb2.AgentMessage, blocks: bool) -> dict[str, int]:
        acks = {}
        for b in msg.logs:
            assert not (b.lines and b.blocks)
            assert (not b.lines) if blocks else (not b.blocks)  # the kind the coordinator said it takes
            lines = batch_lines(b)
            seqs = [s for s, _, _ in lines]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # consecutive
            have = self.stored.setdefault(b.job_id, [])
            assert seqs[0] <= len(have) + 1, "a gap: lines after the coordinator's position"
            have += [ln for ln in lines if ln[0] > len(have)]
            acks[b.job_id] = seqs[-1]
        return acks

    def positions(self) -> dict[str, int]:
        return {job: len(lines) for job, lines in self.stored.items()}


def unsent_in_memory(ob: Outbox) -> tuple[int, int]:
    """The lines and bytes in memory not yet sent, counted job by job (what the outbox keeps as counters)."""
    lines = size = 0
    for jl in ob._logs.values():
        if jl.mem:
            lines += jl.mem[-1].last - max(jl.sent_upto, jl.mem[0].first - 1)
            size += jl.mem_bytes - jl.inflight_bytes
    return lines, size


def assert_counters_agree(ob: Outbox) -> None:
    assert (ob._mem_lines - ob._inflight_lines, ob._mem_bytes - ob._inflight_bytes) == unsent_in_memory(ob)
    assert ob._mem_lines == sum(b.n_lines for jl in ob._logs.values() for b in jl.mem)


line_text = st.text(alphabet=st.sampled_from(["a", "é", "€", " ", "\r", "\t"]), max_size=30)
step = st.one_of(
    st.tuples(
        st.just("add"),
        st.sampled_from(["j1", "j2"]),
        st.sampled_from([OUT, ERR]),
        st.lists(line_text, min_size=1, max_size=40),
    ),
    st.tuples(st.just("send"), st.booleans()),  # the acknowledgement arrives, or is lost
    st.tuples(st.just("reconnect"), st.booleans()),  # the new coordinator takes blocks, or not
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, max_size=40), st.booleans(), st.integers(3, 50), st.integers(200, 4000))
def test_every_line_arrives_once_in_order_whatever_the_reads_bounds_and_reconnects(
    steps: list[tuple[Any, ...]], blocks: bool, max_lines: int, max_bytes: int
) -> None:
    async def main(spool_dir: Path) -> None:
        bounds = OutboxBounds(memory_bytes=3000, job_memory_bytes=1500, job_bytes=1 << 30, total_bytes=1 << 30)
        ob = Outbox(
            max_lines_per_message=max_lines, max_bytes_per_message=max_bytes, spool_dir=spool_dir, bounds=bounds
        )
        coord = Coordinator()
        takes_blocks = blocks
        ob.on_new_stream({}, blocks=takes_blocks)
        added: dict[str, list[tuple[int, int, str]]] = {}
        longest = LINE_OVERHEAD
        biggest = 0  # the cost of the biggest read

        async def send(ack: bool) -> None:
            await ob.refill()
            assert_counters_agree(ob)
            msg = ob.take_logs()
            assert_counters_agree(ob)
            if msg is None:
                return
            lines = [ln for b in msg.logs for ln in batch_lines(b)]
            costs = [len(t) + LINE_OVERHEAD for _, _, t in lines]
            assert len(lines) <= max_lines
            # Over the bound by at most one line: a job's first, taken however long while any room was left.
            assert sum(costs) - max(costs) < max_bytes
            acks = coord.receive(msg, takes_blocks)
            if ack:
                for job, seq in acks.items():
                    ob.ack_logs(job, seq)
                    assert_counters_agree(ob)

        for op in steps:
            if op[0] == "add":
                _, job, stream, texts = op
                have = added.setdefault(job, [])
                have += [(len(have) + 1 + i, int(stream), t) for i, t in enumerate(texts)]
                longest = max(longest, *(len(t) + LINE_OVERHEAD for t in texts))
                biggest = max(biggest, sum(len(t) + LINE_OVERHEAD for t in texts))
                ob.add_text(job, stream, "\n".join(texts))
                assert_counters_agree(ob)
                await ob.room(job)  # what the job's reader does after each read
                # Memory: within its bound but for one line per job (always one, however long), and one
                # block (one read) brought back from the spool.
                assert ob.memory_bytes() <= bounds.memory_bytes + 2 * longest + biggest
            elif op[0] == "send":
                await send(op[1])
            else:
                takes_blocks = op[1]
                ob.on_new_stream(coord.positions(), blocks=takes_blocks)
                assert_counters_agree(ob)
        ob.on_new_stream(coord.positions(), blocks=takes_blocks)  # a lost acknowledgement: the stream was lost
        for _ in range(10_000):
            await send(True)
            if not ob.jobs_with_pending():
                break
        assert coord.stored == added
        assert ob.memory_bytes() == 0 and ob.owed_bytes() == 0

    with tempfile.TemporaryDirectory() as d:
        asyncio.run(main(Path(d)))


def test_a_text_holding_newlines_counts_as_the_lines_it_shows() -> None:
    ob = Outbox()
    ob.on_new_stream({}, blocks=True)
    ob.add_line("j", OUT, "dstack: first\nsecond")  # a system line whose message has a newline
    ob.add_lines("j", ERR, ["x", "y"])
    msg = ob.take_logs()
    assert msg is not None
    assert batch_lines(msg.logs[0]) == [(1, OUT, "dstack: first"), (2, OUT, "second"), (3, ERR, "x"), (4, ERR, "y")]


def test_a_batch_ends_inside_a_block_at_its_bounds_and_the_rest_follows() -> None:
    ob = Outbox(max_lines_per_message=4)
    ob.on_new_stream({}, blocks=True)
    ob.add_text("j", OUT, "\n".join(f"l{i}" for i in range(1, 11)))  # one read: 10 lines
    got = []
    while (msg := ob.take_logs()) is not None:
        (b,) = msg.logs
        assert [(k.first_seq, k.count) for k in b.blocks] in ([(1, 4)], [(5, 4)], [(9, 2)])
        got += batch_lines(b)
        ob.ack_logs("j", got[-1][0])
    assert [t for _, _, t in got] == [f"l{i}" for i in range(1, 11)]


def test_an_acknowledgement_inside_a_block_keeps_the_rest_for_a_resend() -> None:
    ob = Outbox()
    ob.on_new_stream({}, blocks=True)
    ob.add_text("j", OUT, "a\nb\nc\nd")
    assert ob.take_logs() is not None
    ob.on_new_stream({"j": 2}, blocks=True)  # a new coordinator has lines 1 and 2: 3 and 4 again
    msg = ob.take_logs()
    assert msg is not None and batch_lines(msg.logs[0]) == [(3, OUT, "c"), (4, OUT, "d")]
    ob.ack_logs("j", 4)
    assert ob.memory_bytes() == 0


def test_a_coordinator_that_does_not_take_blocks_gets_log_lines() -> None:
    ob = Outbox()
    ob.on_new_stream({}, blocks=False)
    ob.add_text("j", OUT, "a\nb")
    msg = ob.take_logs()
    assert msg is not None and not msg.logs[0].blocks
    assert [(ln.seq, ln.text) for ln in msg.logs[0].lines] == [(1, "a"), (2, "b")]


@given(st.lists(st.binary(max_size=64) | st.sampled_from([b"\n", b"\r\n", b"\xe2\x82", b"\xac\n", b"\r"]), max_size=60))
def test_the_splitter_gives_the_same_lines_joined_as_one_by_one(chunks: list[bytes]) -> None:
    one_by_one: list[str] = []
    joined: list[str] = []
    a, b = LineSplitter(one_by_one.append), LineSplitter(emit_text=lambda text: joined.extend(text.split("\n")))
    for c in chunks:
        a.feed(c)
        b.feed(c)
    a.close()
    b.close()
    assert joined == one_by_one
