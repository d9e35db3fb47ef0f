"""A step of the wall clock (NTP, an admin's `date -s`) of an hour either way changes no duration the
coordinator measures (coordinator/elapsed.py): no job ends by max_duration early or late, nothing is
preempted, no lost agent is forgotten, and fair share keeps its order. The manual clock steps its
wall clock alone (`step_wall`); only `advance` moves the monotonic clock."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from dstack.protos.v1 import client_pb2, common_pb2
from tests.inproc.factories import JS, TR, Harness, SimAgent, coordinator, job_spec, sim_agent, submit_run, wait_until
from tests.inproc.test_fairshare import NO_LEASES, Pool, add_users, ids, job_of, submit

pytestmark = pytest.mark.inproc
HOUR = 3600.0
STEPS = pytest.mark.parametrize("step", [HOUR, -HOUR], ids=["forward", "back"])


@STEPS
async def test_a_wall_clock_step_neither_ends_a_job_by_max_duration_nor_delays_it(tmp_path: Path, step: float) -> None:
    async with coordinator(tmp_path, lease_timeout_s=NO_LEASES) as h, sim_agent(h, "a") as a:
        spec = job_spec("main", "train")
        spec.max_duration_s = 60
        run = await submit_run(h, spec)
        job_id = run.jobs[0].id
        await a.wait_assignments(1)
        await a.report(job_id, JS.JOB_STATUS_RUNNING)
        await h.clock.advance(10)
        h.clock.step_wall(step)
        await h.clock.advance(45)  # 55 s run: under its limit, whatever the wall clock says
        assert not await _stop_requested(h, job_id), "stopped by max_duration before it ran 60 s"
        assert not _stops(a)
        await h.clock.advance(6)  # 61 s
        await a.until(lambda: _stops(a) == [job_id], "the stop at 60 s")
        await a.report(job_id, JS.JOB_STATUS_STOPPED, TR.TERMINATION_REASON_STOPPED_BY_USER)
        job = await h.wait_job(run.name, "main", [JS.JOB_STATUS_FAILED, JS.JOB_STATUS_STOPPED])
        assert job.termination_reason == TR.TERMINATION_REASON_MAX_DURATION


@STEPS
async def test_a_wall_clock_step_does_not_forget_a_lost_agent(tmp_path: Path, step: float) -> None:
    forget_s = 600.0
    async with coordinator(tmp_path, lease_timeout_s=5.0, forget_lost_agents_after_s=forget_s) as h:
        async with sim_agent(h, "a"):
            pass  # connected once, then gone
        await h.clock.advance(6)
        await h.wait_agent("a", "lost")
        h.clock.step_wall(step)
        await h.clock.advance(forget_s - 60)  # the forgetting sweep runs every minute meanwhile
        assert await h.agent("a") is not None, "forgotten before it was lost for --forget-lost-agents-after"
        await h.clock.advance(120)
        await wait_until(_gone(h, "a"), "a forgotten")


@STEPS
async def test_a_wall_clock_step_preempts_nothing(tmp_path: Path, step: float) -> None:
    async with (
        coordinator(tmp_path, lease_timeout_s=NO_LEASES, reserve_after_s=300.0, preempt_after_s=120.0) as h,
        sim_agent(h, "gpu-1", gpus=1) as agent,
    ):
        await add_users(h)
        pool = Pool(h, agent)
        spec = job_spec("main", "train")
        spec.resources.gpu.CopyFrom(common_pb2.GpuRequest(count=1))
        spec.resources.interruptible = True
        req = client_pb2.SubmitRunRequest(workflow="w", jobs=[spec])
        victim: client_pb2.SubmitRunResponse = await h.client.SubmitRun(
            req, metadata=[("authorization", "Bearer tok-alice")]
        )
        await pool.settle()
        await pool.advance(30)
        waiting = await submit(h, "bob")  # below alice's usage: fair share would preempt after 120 s
        await pool.settle()
        h.clock.step_wall(step)
        await pool.advance(60)  # 60 s of waiting, on the monotonic clock
        assert not [s for m in agent.received for s in m.stops], "preempted before --preempt-after"
        assert (await job_of(h, waiting)).status in (JS.JOB_STATUS_SUBMITTED, JS.JOB_STATUS_PENDING)
        await pool.advance(70)  # 130 s: now it is due
        await agent.until(lambda: bool([s for m in agent.received for s in m.stops]), "the preemption at 120 s")
        assert victim.run.jobs[0].id in [s.job_id for m in agent.received for s in m.stops]


@STEPS
async def test_a_wall_clock_step_keeps_the_fair_share_order(tmp_path: Path, step: float) -> None:
    async with coordinator(tmp_path, lease_timeout_s=NO_LEASES) as h, sim_agent(h, "gpu-1", gpus=1) as agent:
        await add_users(h)
        pool = Pool(h, agent)
        # alice used the GPU for 100 s; bob's job has run 30 s when both queue one more job.
        first = await submit(h, "alice")
        await pool.settle()
        await pool.advance(100)
        await pool.finish(first.jobs[0].id)
        bob_running = await submit(h, "bob")
        await pool.settle()
        assert pool.running(ids([bob_running]))
        await pool.advance(30)
        alice_next, bob_next = await submit(h, "alice"), await submit(h, "bob")
        await pool.settle()
        before = [(await job_of(h, r)).queue_position for r in (bob_next, alice_next)]
        assert before == [1, 2], before  # bob has used less
        h.clock.step_wall(step)
        h.coordinator.engine.kick()  # a pass on the stepped clock
        await pool.advance(1)
        after = [(await job_of(h, r)).queue_position for r in (bob_next, alice_next)]
        assert after == before, f"the order changed with the wall clock: {before} -> {after}"


async def _stop_requested(h: Harness, job_id: str) -> bool:
    store = h.coordinator.engine.store
    row = await h.coordinator.engine.db(store.row, "SELECT stop_requested FROM jobs WHERE id = ?", [job_id])
    return bool(row and row[0])


def _stops(agent: SimAgent) -> list[str]:
    return [s.job_id for m in agent.received for s in m.stops]


def _gone(h: Harness, name: str) -> Callable[[], Awaitable[bool | None]]:
    async def check() -> bool | None:
        return True if await h.agent(name) is None else None

    return check


@STEPS
async def test_a_wall_clock_step_reserves_no_agent_for_a_job_that_waited_a_moment(tmp_path: Path, step: float) -> None:
    async with (
        coordinator(tmp_path, lease_timeout_s=NO_LEASES, reserve_after_s=300.0, preempt_after_s=math.inf) as h,
        sim_agent(h, "gpu-1", gpus=2) as agent,
    ):
        await add_users(h)
        pool = Pool(h, agent)
        await submit(h, "alice")
        await submit(h, "alice")
        await pool.settle()
        big = await submit(h, "carol", gpus=2, workflow="big")
        await submit(h, "alice")  # a smaller job waits too: only jobs above the smallest reserve
        await pool.settle()
        h.clock.step_wall(step)
        h.coordinator.engine.kick()
        await pool.advance(10)
        assert (await job_of(h, big)).wait_reason != "reservation"
        await pool.advance(300)  # now it has waited past --reserve-after
        h.coordinator.engine.kick()
        await pool.advance(1)
        assert (await job_of(h, big)).wait_reason == "reservation"
