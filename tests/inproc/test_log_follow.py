"""Following a job's log through chunks (coordinator/store/logs.py): a follower is woken by the chunk
being stored, not by a polling interval, and an agent that resends an overlapping batch after a
reconnect shows every line once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dstack.coordinator.app import logs as app_logs
from dstack.protos.v1 import client_pb2
from tests.inproc.factories import JS, TR, coordinator, job_ids, job_spec, sim_agent, submit_run

pytestmark = pytest.mark.inproc


async def test_a_follower_wakes_when_a_chunk_is_stored_and_a_resend_shows_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without a wake-up a follower would not read again within the test's time.
    monkeypatch.setattr(app_logs, "FOLLOW_RECHECK_S", 3600.0)
    async with coordinator(tmp_path) as h, sim_agent(h, "sim") as agent:
        run = await submit_run(h, job_spec("main"))
        job_id = job_ids(run)["main"]
        await agent.wait_assignments(1)
        await agent.report(job_id, JS.JOB_STATUS_RUNNING)

        seen: list[tuple[int, str]] = []
        got, five = asyncio.Event(), asyncio.Event()

        async def follow() -> None:
            req = client_pb2.StreamLogsRequest(run_name=run.name, follow=True)
            async for resp in h.client.StreamLogs(req, metadata=h.meta):
                seen.extend((ln.seq, ln.text) for jl in resp.jobs for ln in jl.lines)
                got.set()
                if len(seen) >= 5:
                    five.set()

        follower = asyncio.create_task(follow())
        try:
            await asyncio.sleep(0.2)  # the follower is waiting on its run (no lines yet)
            await agent.log(job_id, 1, "one", "two", "three")
            await asyncio.wait_for(got.wait(), 60)
            # The agent reconnects and resends from an older position: 2..5 overlaps 2..3.
            await agent.log(job_id, 2, "two", "three", "four", "five")
            await asyncio.wait_for(five.wait(), 60)
            await agent.report(job_id, JS.JOB_STATUS_DONE, TR.TERMINATION_REASON_DONE)
            await asyncio.wait_for(follower, 60)
        finally:
            follower.cancel()
        assert seen == [(1, "one"), (2, "two"), (3, "three"), (4, "four"), (5, "five")]
        assert [(s, t) for _, s, t in await h.logs(run.name)] == seen
