"""A full agent disk on the coordinator's side (issue 16): the agent that says its disk is full drains (no new
job lands there, a waiting job says why), takes jobs again when it says the space is back, and a job its
full disk ended is a new attempt elsewhere, within a bound.

Scripted agents (SimAgent) through the real AgentService; the scheduler, store and lifecycle are real."""

from __future__ import annotations

from pathlib import Path

import pytest

from dstack.agent.diskspace import MinFree
from dstack.protos.v1 import agent_pb2, client_pb2
from tests.inproc.factories import (
    JS,
    TR,
    GatedRuntime,
    SimAgent,
    coordinator,
    inventory,
    job_ids,
    job_spec,
    real_agent,
    sim_agent,
    submit_run,
    wait_until,
)

pytestmark = pytest.mark.inproc
MIB = 1 << 20


async def disk(agent: SimAgent, full: bool) -> None:
    """A heartbeat whose inventory says the agent's disk is full (or not), acknowledged by a round trip."""
    inv = inventory(agent.name, agent.cpu, agent.gpus)
    inv.work_dir, inv.min_free_disk_bytes = f"/srv/{agent.name}/jobs", 64 * MIB
    inv.disk_free_bytes, inv.disk_full = (3 * MIB, True) if full else (900 * MIB, False)
    await agent.send(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(inventory=inv)))

    async def stored() -> bool:
        a = await agent.h.agent(agent.name)
        return a is not None and a.inventory.disk_full == full

    await wait_until(stored, f"{agent.name}'s disk to be {'full' if full else 'free'}")


async def fail_disk_full(agent: SimAgent, wire_id: str) -> None:
    message = f"agent disk full on {agent.name}: 3 MiB free in /srv/{agent.name}/jobs preparing the job"
    update = agent_pb2.JobUpdate(
        job_id=wire_id, status=JS.JOB_STATUS_FAILED, termination_reason=TR.TERMINATION_REASON_DISK_FULL, message=message
    )
    await agent.send(agent_pb2.AgentMessage(updates=[update]))
    await agent.until(lambda: (wire_id, JS.JOB_STATUS_FAILED) in agent.update_acks(), f"ack of {wire_id} failed")


async def test_a_draining_agent_gets_no_job_the_job_says_why_and_it_is_placed_when_the_space_is_back(
    tmp_path: Path,
) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h, "full", cpu=1) as full:
        await disk(full, True)
        listed = await h.agent("full")
        assert listed is not None and listed.status == "online" and listed.inventory.disk_free_bytes == 3 * MIB
        run = await submit_run(h)

        async def waits_for_the_disk() -> str:
            job = await h.job(run.name)
            return job.message if "draining: disk full" in job.message else ""

        why = await wait_until(waits_for_the_disk, "the job to wait, naming the draining agent")
        assert why == "waiting: 1 CPU free on no agent; busy: full (draining: disk full, 3 MiB free in /srv/full/jobs)"
        assert (await h.job(run.name)).status == JS.JOB_STATUS_PENDING  # waits: not unschedulable
        assert not full.assignments()

        await disk(full, False)  # the space is back: a pass places the job at once, no new event needed
        (placed,) = await full.wait_assignments(1)
        assert placed.job_id == run.jobs[0].id


async def test_a_job_its_agents_full_disk_ended_runs_on_another_agent_and_only_so_often(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h, "a", cpu=1) as a:
        run = await submit_run(h, job_spec("main", "train"))  # no `retry`: a full disk is not the job's fault
        job_id = run.jobs[0].id
        (first,) = await a.wait_assignments(1)
        async with sim_agent(h, "b", cpu=1) as b:
            await fail_disk_full(a, first.job_id)
            (second,) = await b.wait_assignments(1)  # the next attempt avoids the agent whose disk was full
            assert second.job_id == f"{job_id}-a2" and second.env["DSTACK_ATTEMPT"] == "2"
            job = await h.job(run.name)
            assert job.status == JS.JOB_STATUS_ASSIGNED and job.attempt == 2
            (ended,) = job.attempts
            assert ended.termination_reason == TR.TERMINATION_REASON_DISK_FULL
            assert ended.message.startswith("agent disk full on a: 3 MiB free in /srv/a/jobs")

            await fail_disk_full(b, second.job_id)
            third = (await a.wait_assignments(2))[1]
            assert third.job_id == f"{job_id}-a3"
            await fail_disk_full(a, third.job_id)  # the third attempt ended by a full disk is the last

            async def failed() -> int:
                job = await h.job(run.name)
                return int(job.termination_reason) if job.status == JS.JOB_STATUS_FAILED else 0

            assert await wait_until(failed, "the job to fail") == TR.TERMINATION_REASON_DISK_FULL
            job = await h.job(run.name)
            assert job.message.endswith("(attempt 3; no more attempts after a full disk)")
            assert "agent disk full on a" in job.message
            assert len(job.attempts) == 2 and len(b.assignments()) == 1


async def test_the_real_agent_ends_a_job_that_failed_on_a_full_disk_drains_and_runs_its_next_attempt_once_space_is_back(
    tmp_path: Path,
) -> None:
    """agent/runner.py and agent/connection.py: the job's own writes met the full disk (it exits 1 while the
    work folder is below the floor): not its code's fault. The floor is raised under the agent's feet, as a
    disk filling up would look to it."""
    runtime = GatedRuntime()
    async with coordinator(tmp_path, heartbeat_interval_s=0.2) as h, real_agent(h, runtime=runtime) as agent:
        run = await submit_run(h, job_spec("main", "python train.py"))
        job_id = job_ids(run)["main"]
        proc = await runtime.started(job_id)
        agent.disk.min_free = MinFree(size=1 << 62)  # more than any disk: below the floor from now on
        proc.exit(1)

        async def requeued() -> client_pb2.Job | None:
            job = await h.job(run.name, "main")
            return job if job.attempt == 2 else None

        job = await wait_until(requeued, "attempt 2")
        (ended,) = job.attempts
        assert ended.termination_reason == TR.TERMINATION_REASON_DISK_FULL
        assert ended.message.startswith("agent disk full on agent-1: ") and ended.message.endswith(
            "; the job exited with code 1"
        )

        async def draining() -> bool:
            listed = await h.agent("agent-1")
            return listed is not None and listed.inventory.disk_full

        # Draining: attempt 2 waits, saying why. Both come a heartbeat and a pass after the requeue, so they are
        # waited for (read at once, under load they were not there yet).
        await wait_until(draining, "the agent to report its disk full")

        async def waits_saying_why() -> client_pb2.Job | None:
            job = await h.job(run.name, "main")
            return job if "(draining: disk full, " in job.message else None

        waiting = await wait_until(waits_saying_why, "attempt 2 to wait for the draining agent")
        assert waiting.status == JS.JOB_STATUS_PENDING
        assert f"{job_id}-a2" not in runtime.procs

        agent.disk.min_free = MinFree()  # space back: the agent says so at its next heartbeat
        (await runtime.started(f"{job_id}-a2")).exit(0)
        done = await h.wait_job(run.name, "main", [JS.JOB_STATUS_DONE])
        assert done.attempt == 2
