"""Agents' reports batched across agents on a real coordinator (coordinator/reports.py): the messages that
reach it together go to the store as one call, and a message on a session that is over is refused even when
it comes with the others."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import pytest

from dstack.protos.v1 import agent_pb2, client_pb2
from tests.inproc.factories import JS, TR, SimAgent, coordinator, job_spec, sim_agent, wait_until

pytestmark = pytest.mark.inproc

AGENTS = 6


def _ran(job_id: str) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(
        updates=[
            agent_pb2.JobUpdate(job_id=job_id, status=JS.JOB_STATUS_RUNNING),
            agent_pb2.JobUpdate(
                job_id=job_id, status=JS.JOB_STATUS_DONE, termination_reason=TR.TERMINATION_REASON_DONE
            ),
        ]
    )


async def test_reports_that_come_together_are_one_store_call_and_a_stale_session_among_them_is_refused(
    tmp_path: Path,
) -> None:
    async with coordinator(tmp_path) as h, contextlib.AsyncExitStack() as stack:
        agents: list[SimAgent] = [await stack.enter_async_context(sim_agent(h, f"a{i}", cpu=1)) for i in range(AGENTS)]
        stale = await stack.enter_async_context(sim_agent(h, "stale", cpu=1))
        req = client_pb2.SubmitRunsRequest(
            runs=[client_pb2.SubmitRunRequest(workflow="w", jobs=[job_spec()]) for _ in range(AGENTS + 1)]
        )
        runs = (await h.client.SubmitRuns(req, metadata=h.meta)).runs
        jobs = {a.name: (await a.wait_assignments(1))[0].job_id for a in [*agents, stale]}
        engine = h.coordinator.engine
        # The stale agent opens a second stream (session 2): what its first one says is over from then on.
        old_call = stale._call
        assert old_call is not None
        engine.sessions.open(stale.agent_id)

        # Hold the DB thread, so that every message read meanwhile waits for it, then let them all go.
        release, holding = threading.Event(), threading.Event()

        def hold() -> None:
            holding.set()
            release.wait(60)

        held = engine.db.submit(hold)
        await asyncio.to_thread(holding.wait, 60)
        # A batch of no reports goes to the store and waits behind the hold: every message read meanwhile
        # (screened in its batch, coordinator/reports.py: no trip of its own) waits for it, in the next one.
        batches, messages = engine.reports.batches, engine.reports.messages
        ahead = engine.reports.apply(agents[0].agent_id, [])
        await asyncio.gather(*(a.send(_ran(jobs[a.name])) for a in agents), old_call.write(_ran(jobs["stale"])))

        async def queued() -> bool | None:
            return engine.reports.waiting >= AGENTS or None

        await wait_until(queued, "the agents' messages to wait for the batch ahead of them")
        release.set()
        await held
        await ahead

        async def acked(a: SimAgent) -> None:
            await a.until(lambda: (jobs[a.name], JS.JOB_STATUS_DONE) in a.update_acks(), f"{a.name}'s ack")

        await asyncio.gather(*(acked(a) for a in agents))
        await stale.until(lambda: stale.ended, "the stale stream to end")

        assert engine.reports.messages - messages == 1 + AGENTS  # the stale session's message never got there
        assert engine.reports.batches - batches == 2  # read together: applied together, behind the one ahead
        finished = [await h.run(r.name) for r in runs]
        done = {j.id for r in finished for j in r.jobs if j.status == JS.JOB_STATUS_DONE}
        assert done == {jobs[a.name] for a in agents}
        stale_job = next(j for r in finished for j in r.jobs if j.id == jobs["stale"])
        assert stale_job.status == JS.JOB_STATUS_ASSIGNED  # its RUNNING and DONE were not applied
