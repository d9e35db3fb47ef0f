"""What follows from an agent's committed reports belongs to the engine, not to the agent's stream.

Once a message's report batch is committed, its follow-up steps (coordinator/engine.py `Engine.on_message`,
`Engine.updates_then`) must run to their end even if the stream ends meanwhile (the agent disconnects, is
partitioned, lost or removed): a job whose row went back to waiting (a retry) joins the engine's queue, a gang
whose member ended is settled. Before, the handler's task (which the stream's end cancels) awaited the batch
and ran them, or the direct path's continuation ran on a task the stream's `close` cancelled: the batch
committed, the job waited in the database, and in a quiet pool nothing placed it until the coordinator
restarted.

Each case holds the DB thread at one of two points: while the message's batch is with the store, or while
the follow-up reads the waiting jobs back (`Engine._requeued`). The stream ends there; then the DB thread is
released. Messages of lines and an update take the handler's path (services/agent.py `handle`); an update alone,
read while nothing of its stream's waits, takes the direct path (agent_stream.py `Session.receive_now`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dstack.coordinator.engine import Engine
from dstack.coordinator.model import JobStatus
from dstack.coordinator.store import Store
from dstack.protos.v1 import agent_pb2, common_pb2
from tests.inproc.factories import (
    JS,
    TR,
    WAIT_S,
    Harness,
    SimAgent,
    coordinator,
    job_spec,
    sim_agent,
    submit_run,
    wait_until,
)

pytestmark = pytest.mark.inproc


class Held:
    """A store call held on the DB thread, once, when `when` says so, until `release`."""

    def __init__(self, store: Store, name: str, when: Callable[..., bool]) -> None:
        self.entered, self.released = threading.Event(), threading.Event()
        plain = getattr(store, name)

        def held(*args: Any, **kwargs: Any) -> Any:
            if not self.entered.is_set() and when(*args, **kwargs):
                self.entered.set()
                self.released.wait(WAIT_S)
            return plain(*args, **kwargs)

        setattr(store, name, held)

    async def reached(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, WAIT_S), "the held store call was never made"

    def release(self) -> None:
        self.released.set()


def hold(engine: Engine, where: str) -> Held:
    """The DB thread held while a FAILED report's batch is with the store (`batch`), or while the follow-up
    reads the jobs back to waiting (`requeue`: armed now, the next read is the report's)."""
    if where == "batch":
        return Held(
            engine.store,
            "apply_job_updates_many",
            lambda reports, *_: any(u.status == JobStatus.FAILED for _, ups in reports for u in ups),
        )
    return Held(engine.store, "waiting_jobs_of", lambda *_: True)


def failed(wire_id: str, path: str) -> agent_pb2.AgentMessage:
    """The attempt's FAILED (exit code 1), with a line before it on the handler's path (lines and updates
    in one message never take the direct path)."""
    msg = agent_pb2.AgentMessage(
        updates=[
            agent_pb2.JobUpdate(
                job_id=wire_id,
                status=JS.JOB_STATUS_FAILED,
                termination_reason=TR.TERMINATION_REASON_EXIT_CODE,
                exit_code=1,
            )
        ]
    )
    if path == "handler":
        line = common_pb2.LogLine(seq=1, stream=common_pb2.LOG_STREAM_STDOUT, text="the last words")
        msg.logs.append(agent_pb2.LogBatch(job_id=wire_id, lines=[line]))
    return msg


def retrying(cpu: float = 1.0, nodes: int = 0) -> common_pb2.JobSpec:
    spec = job_spec("main", "train", cpu=cpu)
    spec.retry.CopyFrom(common_pb2.RetryPolicy(limit=1, on=["error"]))
    spec.resources.nodes = nodes
    return spec


async def stream_ended(h: Harness, agent: SimAgent) -> None:
    """The agent drops its stream; returns once the coordinator's side of it is over (the handler's tasks
    cancelled and awaited, the session closed: services/agent.py `Connect`)."""
    await agent.disconnect()
    hub = h.coordinator.engine.hub

    async def detached() -> bool:
        return agent.agent_id not in hub.connected_ids()

    await wait_until(detached, f"{agent.name}'s stream to end on the coordinator")


async def send_with_the_db_held(h: Harness, agent: SimAgent, msg: agent_pb2.AgentMessage, where: str) -> None:
    """`msg` sent while the DB thread is held at `where`; the agent's stream ends there; then the DB thread
    goes on."""
    held = hold(h.coordinator.engine, where)
    try:
        await agent.send(msg)
        await held.reached()
        await stream_ended(h, agent)
    finally:
        held.release()


@pytest.mark.parametrize("where", ["batch", "requeue"])
@pytest.mark.parametrize("path", ["handler", "direct"])
async def test_a_retried_job_whose_failure_was_committed_as_its_stream_ended_is_placed_on_another_agent(
    tmp_path: Path, path: str, where: str
) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h, "snug", cpu=1) as snug, sim_agent(h, "roomy", cpu=4) as roomy:
        run = await submit_run(h, retrying())  # one CPU: snug is the best fit
        (first,) = await snug.wait_assignments(1)
        await snug.report(first.job_id, JS.JOB_STATUS_RUNNING)
        await send_with_the_db_held(h, snug, failed(first.job_id, path), where)
        (second,) = await roomy.wait_assignments(1)
        assert second.job_id == f"{first.job_id}-a2"
        job = await h.job(run.name)
        assert job.attempt == 2 and job.status == JS.JOB_STATUS_ASSIGNED
        assert [a.termination_reason for a in job.attempts] == [TR.TERMINATION_REASON_EXIT_CODE]
        if path == "handler":  # the line sent with the update was stored (before it: the handler's order)
            assert [t for _, _, t in await h.logs(run.name)] == ["the last words"]


async def test_a_retried_job_whose_failure_was_committed_as_its_stream_ended_goes_back_to_the_agent_when_it_returns(
    tmp_path: Path,
) -> None:
    """The only agent there is: its new stream's hello reconciles nothing of the job (it waits, on no agent),
    so only the follow-up of the committed FAILED puts it in the queue."""
    async with coordinator(tmp_path) as h, sim_agent(h, "only", cpu=1) as agent:
        await submit_run(h, retrying())
        (first,) = await agent.wait_assignments(1)
        await agent.report(first.job_id, JS.JOB_STATUS_RUNNING)
        await send_with_the_db_held(h, agent, failed(first.job_id, "handler"), "batch")
        await agent.connect(active=[])
        (second,) = await agent.wait_assignments(1)
        assert second.job_id == f"{first.job_id}-a2"


@pytest.mark.parametrize("path", ["handler", "direct"])
async def test_a_gang_whose_member_failed_as_its_stream_ended_is_settled(tmp_path: Path, path: str) -> None:
    """A member's end (no retry) fails its gang: the other member is aborted on its agent at once, by the
    sweep that follows the committed report (not a lease check later: none runs on this manual clock)."""
    async with coordinator(tmp_path) as h, sim_agent(h, "a", cpu=1) as a, sim_agent(h, "b", cpu=1) as b:
        spec = job_spec("main", "train", cpu=1)
        spec.resources.nodes = 2
        run = await submit_run(h, spec)
        (on_a,) = await a.wait_assignments(1)
        (on_b,) = await b.wait_assignments(1)
        await a.report(on_a.job_id, JS.JOB_STATUS_RUNNING)
        await b.report(on_b.job_id, JS.JOB_STATUS_RUNNING)
        await send_with_the_db_held(h, a, failed(on_a.job_id, path), "batch")
        await b.until(lambda: any(s.job_id == on_b.job_id and s.abort for m in b.received for s in m.stops), "abort")
        statuses = {j.id: j.status for j in (await h.run(run.name)).jobs}
        assert statuses == {on_a.job_id: JS.JOB_STATUS_FAILED, on_b.job_id: JS.JOB_STATUS_FAILED}
