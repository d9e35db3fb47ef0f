"""The hand-off of stored log chunks to caught-up followers (coordinator/log_feed.py, coordinator/app/logs.py):
a follower sends the chunks the engine hands it once committed; a chunk that does not follow its cursor,
an overflowing buffer (a slow client) or any other change of the run sends it back to the store. Whatever
the interleaving, it sends every line once, in order."""

from __future__ import annotations

import asyncio
import gc
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dstack.coordinator.app import logs as app_logs
from dstack.coordinator.app.core import Core
from dstack.coordinator.app.logs import LogChunk, _hand_off, stream_logs
from dstack.coordinator.artifacts import Artifacts
from dstack.coordinator.attempts import wire_job_id
from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.engine import Engine
from dstack.coordinator.log_feed import Follower, RunWatchers
from dstack.coordinator.model import JobUpdate, LogLine
from dstack.coordinator.store import NewJob, Placement, Store
from dstack.coordinator.store.executor import DbExecutor
from dstack.coordinator.store.logs import StoredChunk, body_of, is_blocks
from dstack.protos.v1 import agent_pb2, common_pb2
from dstack.storage import LocalStore

JS = common_pb2.JobStatus


def chunk(job_id: str, first: int, last: int, blocks: bool = True) -> StoredChunk:
    texts = [f"{job_id} {s:012d}" for s in range(first, last + 1)]  # of one width: bodies of one size
    if blocks:
        msg = agent_pb2.LogBatch(job_id=job_id)
        msg.blocks.add(first_seq=first, count=len(texts), stream=1, time_ns=0, text="\n".join(texts))
        body = msg.SerializeToString()[len(agent_pb2.LogBatch(job_id=job_id).SerializeToString()) :]
    else:
        body = body_of(LogLine(s, 1, 0, t) for s, t in zip(range(first, last + 1), texts, strict=True))
    return StoredChunk(job_id, first, last, 0, False, body)


def seqs(chunks: list[LogChunk], job: str) -> list[int]:
    return [ln.seq for c in chunks for jl in c.jobs if jl.job_name == job for ln in jl.lines]


# ---- the follower's buffer ------------------------------------------------------------------------------
def test_a_follower_reads_the_store_first_then_keeps_what_is_handed_in_order() -> None:
    f = Follower(max_bytes=1 << 20)
    f.offer([chunk("j", 1, 2)])  # before its first read of the store: that read has it
    assert f.take() == ([], True)
    f.offer([chunk("j", 3, 4)])
    f.offer([chunk("j", 5, 5)])
    taken, reread = f.take()
    assert not reread and [(c.first_seq, c.last_seq) for c in taken] == [(3, 4), (5, 5)]
    assert f.take() == ([], False)


def test_an_overflowing_follower_holds_nothing_and_reads_the_store() -> None:
    one, two = chunk("j", 1, 100), chunk("j", 101, 200)
    f = Follower(max_bytes=len(one.body) + len(two.body))
    f.take()
    assert f.offer([one]) and f.offer([two])
    assert not f.offer([chunk("j", 201, 201)])  # over its bound: dropped, the store has them
    assert f.take() == ([], True)
    big = Follower(max_bytes=1)
    big.take()
    assert big.offer([one])  # one offer into an empty buffer is always kept: a chunk bigger than the bound
    assert big.take()[0] == [one]


def test_any_other_change_of_the_run_sends_its_followers_to_the_store() -> None:
    w = RunWatchers(max_bytes=1 << 20)
    with w.follow("r1") as f1, w.follow("r2") as f2:
        f1.take(), f2.take()
        assert w.stored("r1", [chunk("j", 1, 1)]) == 0
        assert f2.take() == ([], False)  # another run's chunk
        w.notify(["r1"])
        assert f1.take() == ([], True)
        assert w.followers("r1") == 1
    assert w.followers("r1") == 0


def test_a_follower_dropped_without_its_finally_is_not_held() -> None:
    w = RunWatchers()
    ctx = w.follow("r")
    f = ctx.__enter__()
    assert w.followers("r") == 1
    del f, ctx
    gc.collect()
    assert w.followers("r") == 0


def test_a_follower_waits_for_chunks_and_rereads_after_the_recheck() -> None:
    async def main() -> None:
        f = Follower()
        f.take()
        waiter = asyncio.create_task(f.wait_or_recheck(30))
        await asyncio.sleep(0)
        assert not waiter.done()
        f.offer([chunk("j", 1, 1)])
        await asyncio.wait_for(waiter, 5)
        f.take()
        await f.wait_or_recheck(0.01)  # nothing came: read the store anyway
        assert f.take() == ([], True)

    asyncio.run(main())


# ---- what a follower sends of what it is handed -----------------------------------------------------------
NAMES = {"ida": "a", "idb": "b"}


def test_handed_chunks_that_follow_the_cursor_are_sent_and_advance_it() -> None:
    cursor = {"a": 4}
    out, sent, whole = _hand_off(
        [chunk("ida", 1, 4), chunk("ida", 5, 9), chunk("idb", 1, 3), chunk("ida", 10, 10)], NAMES, cursor, True
    )
    assert whole and sent == 3  # 1..4 was already sent: skipped
    assert seqs(out, "a") == list(range(5, 11)) and seqs(out, "b") == [1, 2, 3]
    assert out[-1].cursor == cursor == {"a": 10, "b": 3}


def test_a_chunk_partly_sent_is_cut_at_the_cursor() -> None:
    cursor = {"a": 6}
    out, _, whole = _hand_off([chunk("ida", 5, 9)], NAMES, cursor, True)
    assert whole and seqs(out, "a") == [7, 8, 9]


@pytest.mark.parametrize(
    "stopper",
    [
        chunk("ida", 8, 9),  # a gap: 6..7 are in the store only
        chunk("idc", 1, 1),  # a job the follower has not read yet
        chunk("ida", (1 << 32) + 1, (1 << 32) + 5),  # a new attempt's first lines
    ],
)
def test_a_chunk_that_does_not_follow_stops_the_hand_off_after_what_was_sent(stopper: StoredChunk) -> None:
    cursor = {"a": 3}
    out, sent, whole = _hand_off([chunk("ida", 4, 5), stopper, chunk("ida", 6, 7)], NAMES, cursor, True)
    assert not whole and sent == 1
    assert seqs(out, "a") == [4, 5] and out[-1].cursor == cursor == {"a": 5}


def test_blocks_go_to_a_client_that_reads_lines_through_the_store() -> None:
    cursor: dict[str, int] = {}
    out, _, whole = _hand_off([chunk("ida", 1, 2, blocks=False), chunk("ida", 3, 4)], NAMES, cursor, False)
    assert not whole and seqs(out, "a") == [1, 2] and cursor == {"a": 2}
    assert not any(is_blocks(jl.body) for c in out for jl in c.jobs)


def test_responses_stay_within_the_message_budget_and_of_one_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    one = chunk("ida", 1, 100)
    budget = len(one.body) * 2 + 16  # two chunks (a later one's seqs take a byte or two more)
    monkeypatch.setattr(app_logs, "LOG_BATCH_BYTES", budget)
    cursor: dict[str, int] = {}
    handed = [chunk("ida", s, s + 99) for s in range(1, 501, 100)] + [chunk("ida", 501, 510, blocks=False)]
    out, sent, whole = _hand_off(handed, NAMES, cursor, True)
    assert whole and sent == 6 and seqs(out, "a") == list(range(1, 511))
    assert [c.cursor["a"] for c in out] == [200, 400, 500, 510]  # the kind changed at 501
    assert all(len({is_blocks(jl.body)}) == 1 and len(jl.body) <= budget for c in out for jl in c.jobs)


# ---- the whole path, any interleaving -----------------------------------------------------------------------
@dataclass
class World:
    core: Core
    agent: str
    run_id: str
    run_name: str
    jobs: dict[str, str]  # name -> id
    store: Store


@contextmanager
def world(folder: Path, buffer_bytes: int) -> Iterator[World]:
    config = CoordinatorConfig(
        state_dir=folder,
        listen="",
        storage_url="",
        admin_token="a",
        join_token="j",
        log_follow_buffer_bytes=buffer_bytes,
    )
    store = Store(config.db_path)
    db = DbExecutor(store)
    new = [NewJob(n, common_pb2.JobSpec(job_name=n).SerializeToString(), 0, 0, 0, []) for n in ("a", "b")]
    run_name = store.create_run("admin", "wf", b"", "", [], new).name
    run = store.run_by_name(run_name)
    jobs = {j.job_name: j.id for j in store.jobs_of_runs([run.id])[run.id]}
    agent = store.register_agent("h", "tok", b"")
    store.apply_schedule([Placement(j, agent, []) for j in jobs.values()], {}, [])
    engine = Engine(config, store, db)
    try:
        yield World(Core(engine, Artifacts(LocalStore(folder / "objects"))), agent, run.id, run_name, jobs, store)
    finally:
        db.shutdown()
        store.close()


async def print_lines(w: World, job: str, first: int, count: int) -> None:
    """What the agent's stream does with a batch of the job's lines."""
    msg = agent_pb2.AgentMessage()
    b = msg.logs.add(job_id=wire_job_id(w.jobs[job], 1))
    b.blocks.add(
        first_seq=first, count=count, stream=1, text="\n".join(f"{job} {s}" for s in range(first, first + count))
    )
    await w.core.engine.on_message(w.agent, msg)


# ("print a"/"print b", lines) | ("yield", turns) | ("sleep", ms: the store's thread answers meanwhile, and the
# follower catches up) | ("gate", 0/1) | ("notify", 0)
Step = tuple[str, int]

steps = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["print a", "print b"]), st.integers(1, 40)),
        st.tuples(st.just("yield"), st.integers(0, 5)),
        st.tuples(st.just("sleep"), st.sampled_from([1, 10])),
        st.tuples(st.just("gate"), st.integers(0, 1)),
        st.tuples(st.just("notify"), st.just(0)),
    ),
    max_size=40,
)


async def follow_through(w: World, plan: list[Step]) -> tuple[list[LogChunk], dict[str, int]]:
    gate = asyncio.Event()
    gate.set()
    got: list[LogChunk] = []

    async def follower(stream: AsyncIterator[LogChunk]) -> None:
        async for c in stream:
            got.append(c)
            await gate.wait()  # a closed gate: a client that stopped reading (its writes block)

    reader = asyncio.create_task(follower(stream_logs(w.core, w.run_name, follow=True, blocks=True)))
    printed = {"a": 0, "b": 0}
    for what, n in plan:
        if what.startswith("print"):
            job = what[-1]
            await print_lines(w, job, printed[job] + 1, n)
            printed[job] += n
        elif what == "yield":
            for _ in range(n):
                await asyncio.sleep(0)
        elif what == "sleep":
            await asyncio.sleep(n / 1000)
        elif what == "gate":
            gate.set() if n else gate.clear()
        else:
            w.core.engine.watchers.notify([w.run_id])
    done = [JobUpdate(job_id=j, status=JS.JOB_STATUS_DONE) for j in w.jobs.values()]
    await w.core.db(w.store.apply_job_updates, w.agent, done)
    w.core.engine.watchers.notify([w.run_id])
    gate.set()
    await asyncio.wait_for(reader, 30)
    return got, printed


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=steps, buffer=st.sampled_from([64, 600, 1 << 20]))
def test_every_line_once_in_order_whatever_the_interleaving(
    plan: list[Step], buffer: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No recheck: what the follower sends comes from the hand-off or from a read it was sent back to.
    monkeypatch.setattr(app_logs, "FOLLOW_RECHECK_S", 3600.0)
    with tempfile.TemporaryDirectory() as d, world(Path(d), buffer) as w:
        got, printed = asyncio.run(follow_through(w, plan))
    for job in ("a", "b"):
        assert seqs(got, job) == list(range(1, printed[job] + 1))
        assert [ln.text for c in got for jl in c.jobs if jl.job_name == job for ln in jl.lines] == [
            f"{job} {s}" for s in range(1, printed[job] + 1)
        ]
    assert got[-1].finished_run is not None
    for c in got:  # each response's cursor is where its lines end
        for jl in c.jobs:
            assert c.cursor[jl.job_name] == jl.lines[-1].seq


def test_a_caught_up_follower_takes_chunks_from_the_hand_off_not_the_store(tmp_path: Path) -> None:
    async def main(w: World) -> tuple[list[LogChunk], int, int]:
        reads = 0
        read = w.core.read
        progress = asyncio.Event()  # a store read returned, or a response came

        async def counting(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal reads
            out = await read(fn, *args, **kwargs)
            reads += 1  # counted as it returns: the follower then goes on to wait, with no await between
            progress.set()
            return out

        w.core.read = counting  # type: ignore[method-assign]
        got: list[LogChunk] = []

        async def until(done: Callable[[], bool]) -> None:
            while not done():
                progress.clear()
                await asyncio.wait_for(progress.wait(), 30)

        async def collect() -> None:
            async for c in stream_logs(w.core, w.run_name, follow=True, blocks=True):
                got.append(c)
                progress.set()

        reader = asyncio.create_task(collect())
        await until(lambda: reads >= 2)  # the run, then the store (nothing yet): caught up
        before = reads
        for i in range(20):
            await print_lines(w, "a", i * 10 + 1, 10)
            await until(lambda: seqs(got, "a")[-1:] == [i * 10 + 10])  # noqa: B023  (awaited here)
        during = reads - before
        done = [JobUpdate(job_id=j, status=JS.JOB_STATUS_DONE) for j in w.jobs.values()]
        await w.core.db(w.store.apply_job_updates, w.agent, done)
        w.core.engine.watchers.notify([w.run_id])
        await asyncio.wait_for(reader, 30)
        return got, during, int(w.core.engine.metrics.log_chunks_handed._value.get())

    with world(tmp_path, 1 << 20) as w:
        got, store_reads, handed = asyncio.run(main(w))
    assert seqs(got, "a") == list(range(1, 201))
    assert store_reads == 0 and handed == 20


def test_a_follower_whose_client_stops_reading_overflows_then_reads_the_store(tmp_path: Path) -> None:
    """Caught up, then its client stops reading while the job prints more than its buffer: it drops what it
    held, reads the store from its cursor once its client reads again, and sends every line once."""

    async def main(w: World) -> tuple[list[LogChunk], int, int]:
        gate = asyncio.Event()
        gate.set()
        got: list[LogChunk] = []
        progress = asyncio.Event()

        async def collect() -> None:
            async for c in stream_logs(w.core, w.run_name, follow=True, blocks=True):
                got.append(c)
                progress.set()
                await gate.wait()

        async def until(done: Callable[[], bool]) -> None:
            while not done():
                progress.clear()
                await asyncio.wait_for(progress.wait(), 30)

        reader = asyncio.create_task(collect())
        await print_lines(w, "a", 1, 10)
        await until(lambda: seqs(got, "a")[-1:] == [10])
        gate.clear()  # the client takes nothing more
        await print_lines(w, "a", 11, 10)  # handed; the follower sends it, and its write blocks
        await until(lambda: seqs(got, "a")[-1:] == [20])
        for first in range(21, 121, 10):  # more than its buffer holds, while it cannot take them
            await print_lines(w, "a", first, 10)
        gate.set()
        await until(lambda: seqs(got, "a")[-1:] == [120])
        done = [JobUpdate(job_id=j, status=JS.JOB_STATUS_DONE) for j in w.jobs.values()]
        await w.core.db(w.store.apply_job_updates, w.agent, done)
        w.core.engine.watchers.notify([w.run_id])
        await asyncio.wait_for(reader, 30)
        m = w.core.engine.metrics
        return got, int(m.log_follower_overflows._value.get()), int(m.log_chunks_handed._value.get())

    with world(tmp_path, 400) as w:
        got, overflows, handed = asyncio.run(main(w))
    assert seqs(got, "a") == list(range(1, 121))
    assert overflows == 1 and handed >= 1
