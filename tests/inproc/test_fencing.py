"""Fencing on the coordinator's clock (coordinator/fencing.py): an agent declared lost that comes back
still running its old attempt gets no job on its GPUs until that attempt is confirmed dead (or the
bound passes), and what arrives on a stream whose session is over is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from dstack.coordinator.fencing import quarantine_bound_s
from dstack.protos.v1 import agent_pb2, common_pb2
from tests.inproc.factories import (
    JS,
    TR,
    GatedRuntime,
    Harness,
    SimAgent,
    coordinator,
    job_spec,
    real_agent,
    sim_agent,
    submit_run,
    wait_until,
)

pytestmark = pytest.mark.inproc
LEASE_S = 5.0


def gpu_job(name: str, retry_lost: bool = False) -> common_pb2.JobSpec:
    spec = job_spec(name, "train", cpu=1)
    spec.resources.gpu.CopyFrom(common_pb2.GpuRequest(count=1))
    if retry_lost:
        spec.retry.CopyFrom(common_pb2.RetryPolicy(limit=1, on=["agent-lost"]))
    return spec


async def renew(h: Harness, agent: SimAgent) -> None:
    at = h.clock.time_ns()
    await agent.heartbeat()

    async def renewed() -> bool:
        a = await h.agent(agent.name)
        return a is not None and a.last_heartbeat_ns >= at

    await wait_until(renewed, f"{agent.name}'s heartbeat to be stored")


async def lose_a_keep_b(h: Harness, a: SimAgent, b: SimAgent) -> None:
    """a's lease runs out (frozen, partitioned), b's does not."""
    await h.clock.advance(LEASE_S - 0.5)
    await renew(h, b)
    await h.clock.advance(1.0)
    await h.wait_agent(a.name, "lost")


async def test_a_lost_agent_back_with_its_old_attempt_gets_no_job_on_its_gpu_until_that_attempt_is_dead(
    tmp_path: Path,
) -> None:
    async with coordinator(tmp_path, lease_timeout_s=LEASE_S) as h, sim_agent(h, "a", gpus=1) as a:
        first = await submit_run(h, gpu_job("main", retry_lost=True))
        job_id = first.jobs[0].id
        await a.wait_assignments(1)
        await a.report(job_id, JS.JOB_STATUS_RUNNING)
        async with sim_agent(h, "b", gpus=1) as b:
            await lose_a_keep_b(h, a, b)
            (second,) = await b.wait_assignments(1)  # attempt 2 holds b's GPU
            waiting = await submit_run(h, gpu_job("next"))

            # a comes back still running attempt 1 on its GPU 0: told to abort it, and offered nothing.
            answer = await a.connect(active=[job_id])
            assert [(s.job_id, s.abort) for s in answer.stops] == [(job_id, True)]
            await h.coordinator.engine.settled()
            await renew(h, a)
            await h.coordinator.engine.settled()
            assert a.assignments() == [], "a job was placed on a GPU an old attempt may still hold"
            job = await h.job(waiting.name, "next")
            assert job.status in (JS.JOB_STATUS_SUBMITTED, JS.JOB_STATUS_PENDING)

            # Its final update (refused: the attempt is over) says the process is gone: now a is free.
            await a.report(job_id, JS.JOB_STATUS_FAILED, TR.TERMINATION_REASON_STOPPED_BY_USER)
            (placed,) = await a.wait_assignments(1)
            assert placed.job_id == waiting.jobs[0].id and list(placed.gpu_indices) == [0]
            # The refused update changed nothing of the job: attempt 2 runs on b.
            job = await h.job(first.name)
            assert (job.attempt, job.agent_name, job.status) == (2, "b", JS.JOB_STATUS_ASSIGNED)
            assert second.job_id == f"{job_id}-a2"


async def test_an_agent_that_never_confirms_its_old_attempt_dead_is_used_again_after_the_bound(
    tmp_path: Path,
) -> None:
    async with coordinator(tmp_path, lease_timeout_s=LEASE_S) as h, sim_agent(h, "a", gpus=1) as a:
        first = await submit_run(h, gpu_job("main"))  # no retry: the job fails as agent lost
        job_id = first.jobs[0].id
        await a.wait_assignments(1)
        await a.report(job_id, JS.JOB_STATUS_RUNNING)
        async with sim_agent(h, "b") as b:  # keeps the coordinator company; no GPU
            await lose_a_keep_b(h, a, b)
            await h.wait_job(first.name, "main", [JS.JOB_STATUS_FAILED])
            waiting = await submit_run(h, gpu_job("next"))
            await a.connect(active=[job_id])
            bound = quarantine_bound_s(LEASE_S)
            for _ in range(int(bound // (LEASE_S / 2)) - 1):  # a stays online, silent about its old attempt
                await h.clock.advance(LEASE_S / 2)
                await renew(h, a)
                await renew(h, b)
                await h.coordinator.engine.settled()
                if a.assignments():
                    break
            assert a.assignments() == [], "placed on a before the bound passed"
            await h.clock.advance(LEASE_S / 2)
            await renew(h, a)
            (placed,) = await a.wait_assignments(1)
            assert placed.job_id == waiting.jobs[0].id


async def test_a_message_on_a_session_that_is_over_is_refused_and_its_stream_ends(tmp_path: Path) -> None:
    async with coordinator(tmp_path, lease_timeout_s=LEASE_S) as h, sim_agent(h, "a") as a:
        run = await submit_run(h, job_spec("main", "train"))
        job_id = run.jobs[0].id
        await a.wait_assignments(1)
        old_call = a._call
        assert old_call is not None
        # The agent opens a second stream (session 2); its first stream is over from then on.
        engine = h.coordinator.engine
        epoch = engine.sessions.open(a.agent_id)
        assert not engine.sessions.is_current(a.agent_id, epoch - 1)
        line = common_pb2.LogLine(seq=1, stream=common_pb2.LOG_STREAM_STDOUT, text="from the old session")
        await old_call.write(
            agent_pb2.AgentMessage(
                updates=[agent_pb2.JobUpdate(job_id=job_id, status=JS.JOB_STATUS_RUNNING)],
                logs=[agent_pb2.LogBatch(job_id=job_id, lines=[line])],
            )
        )
        await a.until(lambda: a.ended, "the stale stream to end")
        job = await h.job(run.name)
        assert job.status == JS.JOB_STATUS_ASSIGNED  # the RUNNING it carried was not applied
        assert await h.logs(run.name) == []


async def test_the_agent_starts_no_job_on_a_gpu_its_own_running_job_still_holds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Defence in depth, on the agent: were the coordinator to hand out a GPU that a job of this agent
    still holds (a stale attempt being killed), the new job waits for that job to end."""
    runtime = GatedRuntime()
    async with coordinator(tmp_path) as h, real_agent(h, runtime=runtime, simulate_gpus="1xA100-80GB") as agent:
        run = await submit_run(h, gpu_job("main"))
        job_id = run.jobs[0].id
        holder = await runtime.started(job_id)
        # The same GPU (and code) for another job id, as an unfenced coordinator could send it.
        intruder = agent_pb2.JobAssignment()
        intruder.CopyFrom(agent.jobs[job_id].a)
        intruder.job_id = "intruder"
        assert list(intruder.gpu_indices) == [0]
        await agent._handle(agent_pb2.CoordinatorMessage(assignments=[intruder]))
        await wait_until(
            lambda: _true("job intruder waits for GPU(s) [0], still held by " + job_id in caplog.text),
            "the intruder to say it waits for GPU 0",
        )
        assert "intruder" not in runtime.procs
        holder.exit(0)
        (await runtime.started("intruder")).exit(0)
        assert (await h.job(run.name)).status in (JS.JOB_STATUS_RUNNING, JS.JOB_STATUS_UPLOADING, JS.JOB_STATUS_DONE)


async def _true(value: bool) -> bool | None:
    return True if value else None
