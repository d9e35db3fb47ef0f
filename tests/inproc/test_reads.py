"""Listings off the writer (coordinator/store/reader.py): read-only calls are answered on their own
connections while the DB thread is busy, and see every write that was answered before them."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from dstack.protos.v1 import client_pb2
from tests.inproc.factories import JS, coordinator, job_ids, job_spec, sim_agent, submit_run

pytestmark = pytest.mark.inproc
ANSWER_S = 10.0  # far longer than any listing takes, far shorter than the DB thread is held


async def test_listings_are_answered_while_the_db_thread_is_held(tmp_path: Path) -> None:
    """A scheduling pass over a deep queue holds the DB thread for seconds: `dstack ps`, `dstack agents`,
    GetRun and a log read must not wait for it (they waited behind it: ListRuns took 2 s at 100k queued)."""
    async with coordinator(tmp_path) as h, sim_agent(h, "a"):
        run = await submit_run(h, job_spec("x"))
        await h.client.ListRuns(client_pb2.ListRunsRequest(), metadata=h.meta)  # the token is looked up once
        release, entered = threading.Event(), threading.Event()

        def slow_pass() -> None:
            entered.set()
            release.wait(60)

        held = asyncio.ensure_future(h.coordinator.engine.db(slow_pass))
        try:
            await asyncio.to_thread(entered.wait, 10)
            async with asyncio.timeout(ANSWER_S):
                listed = await h.client.ListRuns(client_pb2.ListRunsRequest(), metadata=h.meta)
                got = await h.client.GetRun(client_pb2.GetRunRequest(name=run.name), metadata=h.meta)
                agents = await h.client.ListAgents(client_pb2.ListAgentsRequest(), metadata=h.meta)
                logs = [
                    c
                    async for c in h.client.StreamLogs(
                        client_pb2.StreamLogsRequest(run_name=run.name, follow=False), metadata=h.meta
                    )
                ]
            assert not release.is_set() and not held.done()  # answered while the writer was still held
        finally:
            release.set()
            await held
        assert [r.name for r in listed.runs] == [run.name]
        assert got.run.name == run.name
        assert [a.name for a in agents.agents] == ["a"]
        assert all(not c.lines for c in logs)


async def test_a_write_that_was_answered_is_seen_by_the_next_read(tmp_path: Path) -> None:
    """Read-your-writes across the two connections: a submission, an agent's update and a stop, each
    answered after its commit, are in the listing and the run read right after it, every time."""
    async with coordinator(tmp_path) as h, sim_agent(h, "a", cpu=1) as agent:
        seen: list[str] = []
        for i in range(15):
            run = await submit_run(h, job_spec(f"j{i}"))
            listed = await h.client.ListRuns(client_pb2.ListRunsRequest(limit=1), metadata=h.meta)
            assert [r.name for r in listed.runs] == [run.name], f"submission {i} not listed at once"
            got = await h.client.GetRun(client_pb2.GetRunRequest(name=run.name), metadata=h.meta)
            assert got.run.name == run.name
            seen.append(run.name)
            (job_id,) = job_ids(run).values()
            await agent.wait_assignments(i + 1)
            await agent.report(job_id, JS.JOB_STATUS_RUNNING)  # acknowledged once stored
            got = await h.client.GetRun(client_pb2.GetRunRequest(name=run.name), metadata=h.meta)
            assert got.run.jobs[0].status == JS.JOB_STATUS_RUNNING, f"update {i} not seen at once"
            await agent.report(job_id, JS.JOB_STATUS_DONE)
            got = await h.client.GetRun(client_pb2.GetRunRequest(name=run.name), metadata=h.meta)
            assert got.run.jobs[0].status == JS.JOB_STATUS_DONE
        listed = await h.client.ListRuns(client_pb2.ListRunsRequest(all=True), metadata=h.meta)
        assert sorted(r.name for r in listed.runs) == sorted(seen)
