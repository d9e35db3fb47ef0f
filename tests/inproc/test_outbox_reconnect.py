"""The agent's outbox across a coordinator restart: nothing the job said is lost, nothing acknowledged is resent."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from dstack.agent.connection import Agent
from dstack.coordinator.engine import Engine
from dstack.protos.v1 import agent_pb2
from tests.inproc.factories import JS, GatedRuntime, coordinator, job_ids, job_spec, real_agent, submit_run, wait_until

pytestmark = pytest.mark.inproc


async def test_lines_in_flight_and_lines_made_while_disconnected_arrive_after_reconnect_once_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What any coordinator of this test receives from agents, counted as it arrives (before it is stored).
    lines: Counter[tuple[str, int]] = Counter()
    updates: Counter[tuple[str, int]] = Counter()
    swallow_logs = False  # receive log lines but never store or acknowledge them (a coordinator dying mid-call)
    on_message = Engine.on_message

    async def recording(
        self: Engine, agent_id: str, msg: agent_pb2.AgentMessage, **kw: Any
    ) -> agent_pb2.CoordinatorMessage | None:
        lines.update((b.job_id, ln.seq) for b in msg.logs for ln in b.lines)
        lines.update((b.job_id, k.first_seq + i) for b in msg.logs for k in b.blocks for i in range(k.count))
        updates.update((u.job_id, u.status) for u in msg.updates)
        if swallow_logs and msg.logs:
            await asyncio.Event().wait()  # until the stream's reader is cancelled
        return await on_message(self, agent_id, msg, **kw)

    updates_then = Engine.updates_then

    def recording_updates(self: Engine, agent_id: str, msg: agent_pb2.AgentMessage, *args: Any) -> None:
        # A message of updates alone, read while nothing of its stream's waited, takes the stream's direct path.
        updates.update((u.job_id, u.status) for u in msg.updates)
        updates_then(self, agent_id, msg, *args)

    monkeypatch.setattr(Engine, "on_message", recording)
    monkeypatch.setattr(Engine, "updates_then", recording_updates)
    runtime = GatedRuntime()
    async with coordinator(tmp_path) as h, real_agent(h, runtime=runtime) as agent:

        async def all_acked(a: Agent = agent) -> bool:
            return not a.outbox.jobs_with_pending()

        run = await submit_run(h, job_spec("main", "echo start"))
        job_id = job_ids(run)["main"]
        proc = await runtime.started(job_id)
        proc.say("before")
        await h.wait_logs(run.name, ["echo start", "before"])
        await wait_until(all_acked, "the agent to hold nothing unacknowledged")

        # A line reaches the coordinator, which goes down before storing it: sent, never acknowledged.
        swallow_logs = True
        proc.say("in flight")

        async def in_flight() -> bool:
            return lines[(job_id, 3)] == 1

        await wait_until(in_flight, "the coordinator to receive line 3")
        await h.stop()
        swallow_logs = False
        # While no coordinator is there, the job writes more and ends: the outbox keeps all of it.
        proc.say("during")
        proc.exit(0)

        async def ended_offline(a: Agent = agent) -> bool:
            return not a.jobs and a.outbox.jobs_with_pending() == {job_id}

        await wait_until(ended_offline, "the job to end with its lines and final update in the outbox")
        assert not updates[(job_id, JS.JOB_STATUS_DONE)]

        await h.start_again()
        await h.wait_job(run.name, "main", [JS.JOB_STATUS_DONE])
        assert await h.logs(run.name) == [
            ("main", 1, "echo start"),
            ("main", 2, "before"),
            ("main", 3, "in flight"),
            ("main", 4, "during"),
        ]
        await wait_until(all_acked, "the agent to get every acknowledgement")
        # The unacknowledged line went again; everything acknowledged, and everything new, went once.
        assert lines == Counter({(job_id, 1): 1, (job_id, 2): 1, (job_id, 3): 2, (job_id, 4): 1})
        assert updates == Counter({(job_id, JS.JOB_STATUS_RUNNING): 1, (job_id, JS.JOB_STATUS_DONE): 1})
