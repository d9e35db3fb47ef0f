"""StreamLogs' cursor: a stream that meets the log archiver mid-way returns every line exactly once,
and a stream resumed from a cursor returns exactly the lines after it (database or archive)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dstack.coordinator.app.core import Core
from dstack.coordinator.app.logs import LogChunk, stream_logs
from dstack.coordinator.artifacts import Artifacts
from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.engine import Engine
from dstack.coordinator.model import JobUpdate, LogBatch, LogLine
from dstack.coordinator.retention import Retention
from dstack.coordinator.store import NewJob, Placement, Store
from dstack.coordinator.store.executor import DbExecutor
from dstack.protos.v1 import common_pb2
from dstack.storage import LocalStore

LINES = 100_000
JS = common_pb2.JobStatus


@dataclass
class World:
    core: Core
    retention: Retention
    run_name: str
    jobs: list[str]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    config = CoordinatorConfig(
        state_dir=tmp_path, listen="", storage_url="", admin_token="a", join_token="j", archive_after_s=0.0
    )
    store = Store(config.db_path)
    db = DbExecutor(store)
    names = ["a", "b"]
    new = [NewJob(n, common_pb2.JobSpec(job_name=n).SerializeToString(), 0, 0, 0, []) for n in names]
    run_name = store.create_run("admin", "wf", b"", "", [], new).name
    run = store.run_by_name(run_name)
    ids = [j.id for j in store.jobs_of_runs([run.id])[run.id]]
    agent = store.register_agent("h", "tok", b"")
    store.apply_schedule([Placement(j, agent, []) for j in ids], {}, [])
    for job_id in ids:
        for start in range(1, LINES + 1, 10_000):
            lines = [LogLine(s, 0, 0, f"{job_id[:4]} line {s}") for s in range(start, start + 10_000)]
            store.insert_logs([LogBatch(job_id, lines)])
    store.apply_job_updates(agent, [JobUpdate(job_id=j, status=JS.JOB_STATUS_DONE) for j in ids])
    artifacts = Artifacts(LocalStore(tmp_path / "objects"))
    engine = Engine(config, store, db)
    try:
        yield World(Core(engine, artifacts), Retention(config, store, db, artifacts), run_name, names)
    finally:
        db.shutdown()
        store.close()


def seqs(chunks: list[LogChunk], job: str) -> list[int]:
    return [ln.seq for c in chunks for jl in c.jobs if jl.job_name == job for ln in jl.lines]


async def collect(stream: AsyncIterator[LogChunk], archive_after: int, world: World) -> list[LogChunk]:
    out: list[LogChunk] = []
    async for chunk in stream:
        out.append(chunk)
        if len(out) == archive_after:
            assert await world.retention.pass_once() == len(world.jobs)  # the archiver, mid-way
    return out


@pytest.mark.parametrize("follow", [False, True])
def test_a_stream_that_meets_the_archiver_returns_every_line_once(world: World, follow: bool) -> None:
    chunks = asyncio.run(collect(stream_logs(world.core, world.run_name, follow), 3, world))
    for job in world.jobs:
        assert seqs(chunks, job) == list(range(1, LINES + 1))
    assert (chunks[-1].finished_run is not None) == follow
    assert chunks[-1].cursor == dict.fromkeys(world.jobs, LINES)


def test_the_archiver_running_alongside_a_stream(world: World) -> None:
    async def main() -> list[LogChunk]:
        archiver = asyncio.create_task(world.retention.pass_once())
        out = [c async for c in stream_logs(world.core, world.run_name, follow=True)]
        assert await archiver == len(world.jobs)
        return out

    chunks = asyncio.run(main())
    for job in world.jobs:
        assert seqs(chunks, job) == list(range(1, LINES + 1))


@pytest.mark.parametrize("archived", [False, True])
def test_resuming_from_a_cursor(world: World, archived: bool) -> None:
    async def main() -> list[LogChunk]:
        if archived:
            await world.retention.pass_once()
        first = await anext(stream_logs(world.core, world.run_name, follow=False))
        assert first.cursor  # where to resume after this chunk
        after = dict(first.cursor) | {"b": 77_777}
        return [first] + [c async for c in stream_logs(world.core, world.run_name, False, after)]

    chunks = asyncio.run(main())
    assert seqs(chunks, "a") == list(range(1, LINES + 1))
    before = chunks[0].cursor.get("b", 0)
    assert before < 77_777
    assert seqs(chunks, "b") == list(range(1, before + 1)) + list(range(77_778, LINES + 1))
