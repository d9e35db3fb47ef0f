"""Removal and approval at the protocol level: what a removed agent's stream and calls get, and that
a pending agent is sent nothing until an admin approves it."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from dstack.coordinator.errors import Unauthenticated
from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, client_pb2
from tests.inproc.factories import (
    JS,
    TR,
    Harness,
    SimAgent,
    coordinator,
    job_ids,
    job_spec,
    sim_agent,
    submit_run,
    wait_until,
)

pytestmark = pytest.mark.inproc
REMOVED = "this agent was removed by an admin"


async def remove(h: Harness, name: str) -> int:
    resp: client_pb2.RemoveAgentResponse = await h.client.RemoveAgent(
        client_pb2.RemoveAgentRequest(name=name), metadata=h.meta
    )
    return resp.failed_jobs


async def test_a_removed_agent_is_told_to_abort_its_job_and_its_stream_ends(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h, "gpu-1") as agent:
        run = await submit_run(h)
        [assigned] = await agent.wait_assignments(1)
        await agent.report(assigned.job_id, JS.JOB_STATUS_RUNNING)
        assert await remove(h, "gpu-1") == 1
        await agent.until(lambda: agent.ended, "the coordinator to end the removed agent's stream")
        stops = [s for m in agent.received for s in m.stops]
        assert [(s.job_id, s.abort) for s in stops] == [(assigned.job_id, True)]
        job = (await h.run(run.name)).jobs[0]
        assert job.status == JS.JOB_STATUS_FAILED and job.termination_reason == TR.TERMINATION_REASON_AGENT_LOST
        assert job.message == "agent gpu-1 was removed by an admin"
        listed = await h.agent("gpu-1")
        assert listed is not None and listed.status == "removed"

        # It reconnects, as an agent does: refused before its hello is read. grpc's client turns the refusal
        # into INTERNAL ("Internal error from Core") when its write of the hello was still under way as the
        # call ended (grpc.aio _write: set_internal_error); the agent retries that, and so does this test.
        for _ in range(20):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await agent.connect()
            if refused.value.code() != grpc.StatusCode.INTERNAL:
                break
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED and REMOVED in (refused.value.details() or "")
        assert len(agent.assignments()) == 1  # the first session's only: nothing new
        # A report for its old job, on a fresh call, is refused too.
        async with grpc.aio.insecure_channel(h.address) as ch:
            stub = agent_pb2_grpc.AgentServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GrantUploads(
                    agent_pb2.GrantUploadsRequest(job_id=assigned.job_id),
                    metadata=[("authorization", f"Bearer {agent.token}")],
                )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_hello_racing_with_the_removal_does_not_bring_the_agent_back(tmp_path: Path) -> None:
    """The stream was authenticated, then the agent was removed, then its hello arrived."""
    async with coordinator(tmp_path) as h:
        agent = await SimAgent(h, "racer").register()
        try:
            await remove(h, "racer")
            hello = agent_pb2.AgentMessage(hello=agent_pb2.Hello(agent_id=agent.agent_id))
            with pytest.raises(Unauthenticated, match=REMOVED):
                await h.coordinator.engine.on_hello(agent.agent_id, hello)
            listed = await h.agent("racer")
            assert listed is not None and listed.status == "removed"
        finally:
            await agent.close()


async def test_a_pending_agent_gets_no_assignment_until_approved(tmp_path: Path) -> None:
    async with coordinator(tmp_path, approve_agents=True) as h, sim_agent(h, "fake", cpu=64) as agent:
        listed = await h.agent("fake")
        assert listed is not None and listed.status == "pending approval"
        assert listed.inventory.cpu_count == 64  # what it claims, for the admin to judge
        run = await submit_run(h, job_spec("a"))

        async def waiting_reason() -> str:
            return (await h.job(run.name, "a")).message

        await wait_until(waiting_reason, "a scheduling pass to leave the job waiting")
        assert agent.assignments() == []
        await h.client.ApproveAgent(client_pb2.ApproveAgentRequest(name="fake"), metadata=h.meta)
        [assigned] = await agent.wait_assignments(1)
        assert assigned.job_id == job_ids(run)["a"]
        listed = await h.agent("fake")
        assert listed is not None and listed.status == "online"
