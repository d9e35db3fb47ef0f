"""The preemption policy through the real coordinator: fair share and reservations preempt
interruptible jobs (coordinator/preemption.py), on the manual clock, with SimAgents' simulated GPUs.

A SimAgent stops a job only when the test says so: `stop_what_was_asked` answers every stop it was sent
as a real agent would after the grace period (the job reported stopped)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dstack.cli.render import preempted_text
from dstack.coordinator.preemption import RunningJob
from dstack.protos.v1 import client_pb2, common_pb2
from tests.inproc.factories import JS, TR, Harness, SimAgent, coordinator, sim_agent
from tests.inproc.test_fairshare import NO_LEASES, Pool, add_users, ids, job_of, meta

pytestmark = pytest.mark.inproc


async def submit(
    h: Harness, user: str, gpus: int = 1, interruptible: bool = False, workflow: str = "train"
) -> client_pb2.Run:
    spec = common_pb2.JobSpec(
        job_name="main",
        workflow=workflow,
        provider="bash",
        commands=["true"],
        resources=common_pb2.Resources(gpu=common_pb2.GpuRequest(count=gpus), interruptible=interruptible),
    )
    resp: client_pb2.SubmitRunResponse = await h.client.SubmitRun(
        client_pb2.SubmitRunRequest(workflow=workflow, jobs=[spec]), metadata=meta(user)
    )
    return resp.run


def stops(*agents: SimAgent) -> list[str]:
    return [s.job_id for a in agents for m in a.received for s in m.stops]


async def stop_what_was_asked(pool: Pool, answered: set[str]) -> None:
    for a in pool.agents:
        for job_id in stops(a):
            if job_id not in answered:
                answered.add(job_id)
                await a.report(job_id, JS.JOB_STATUS_STOPPED, TR.TERMINATION_REASON_STOPPED_BY_USER)
    await pool.settle()


async def test_a_user_below_fair_share_preempts_one_interruptible_job_which_runs_again_later(tmp_path: Path) -> None:
    async with (
        coordinator(tmp_path, lease_timeout_s=NO_LEASES, preempt_after_s=60, preempt_min_run_s=60) as h,
        sim_agent(h, "gpu-1", gpus=4) as agent,
    ):
        await add_users(h)
        pool = Pool(h, agent)
        a_runs = [await submit(h, "alice", interruptible=True) for _ in range(4)]
        await pool.settle()
        assert len(pool.running(ids(a_runs))) == 4
        await pool.advance(30)
        b = await submit(h, "bob")
        await pool.settle()
        await pool.advance(50)
        assert stops(agent) == []  # bob has waited 50 s of the 60 s --preempt-after
        await pool.advance(11)
        await agent.until(lambda: stops(agent), "a preemption for bob")
        (victim,) = stops(agent)
        assert victim in ids(a_runs)
        await pool.advance(5)
        assert stops(agent) == [victim]  # one GPU was needed: one job, asked once
        await stop_what_was_asked(pool, set())
        assert pool.running(ids([b]))  # bob's job starts on the freed GPU, not alice's next attempt
        preempted = next(r for r in a_runs if r.jobs[0].id == victim)
        job = await job_of(h, preempted)
        assert job.status == JS.JOB_STATUS_PENDING and job.attempt == 2
        (first,) = job.attempts
        assert first.termination_reason == TR.TERMINATION_REASON_PREEMPTED
        assert first.message == f"preempted for bob's job {b.name}/main (fair share)"
        listed = await h.client.ListRuns(client_pb2.ListRunsRequest(), metadata=h.meta)
        shown = next(r for r in listed.runs if r.name == preempted.name)  # as `dstack ps` gets it
        assert preempted_text(shown) == f"attempt 1 preempted for bob's job {b.name}/main (fair share)"
        await pool.finish(b.jobs[0].id)
        assert f"{victim}-a2" in pool.started  # attempt 2 runs once bob's job is done
        assert len(stops(agent)) == 1  # and alice's attempts never preempt anyone (interruptible jobs do not)


async def test_jobs_that_are_not_interruptible_are_never_preempted(tmp_path: Path) -> None:
    async with (
        coordinator(tmp_path, lease_timeout_s=NO_LEASES, preempt_after_s=60, preempt_min_run_s=60) as h,
        sim_agent(h, "gpu-1", gpus=4) as agent,
    ):
        await add_users(h)
        pool = Pool(h, agent)
        a_runs = [await submit(h, "alice") for _ in range(4)]
        await pool.settle()
        await pool.advance(30)
        b = await submit(h, "bob")
        await pool.settle()
        for _ in range(4):
            await pool.advance(60)
        assert stops(agent) == [] and len(pool.running(ids(a_runs))) == 4
        job = await job_of(h, b)
        assert job.status == JS.JOB_STATUS_PENDING and job.wait_reason in ("fair-share", "resources")


async def test_while_no_job_may_be_preempted_the_lease_loop_neither_walks_the_long_waits_nor_reads_running_jobs(
    tmp_path: Path,
) -> None:
    # Issue 16: every second the preemption check walked every job waiting past --preempt-after (the whole
    # queue, at a deep one, on the event loop) and built a record per job on an agent, parsing its spec,
    # to find no interruptible job. Now the DB thread is asked first whether any job may be preempted.
    async with (
        coordinator(tmp_path, lease_timeout_s=NO_LEASES, preempt_after_s=60, preempt_min_run_s=60) as h,
        sim_agent(h, "gpu-1", gpus=4) as agent,
    ):
        await add_users(h)
        pool = Pool(h, agent)
        engine = h.coordinator.engine
        walks, reads = [0], [0]
        longer_than, running_for_preemption = engine.waits.longer_than, engine.store.running_for_preemption

        def counted_walk(seconds: float, waiting: object) -> list[str]:
            walks[0] += 1
            return longer_than(seconds, waiting)  # type: ignore[arg-type]

        def counted_read() -> list[RunningJob]:
            reads[0] += 1
            return running_for_preemption()

        engine.waits.longer_than = counted_walk  # type: ignore[method-assign]
        engine.store.running_for_preemption = counted_read
        a_runs = [await submit(h, "alice") for _ in range(4)]
        await pool.settle()
        await pool.advance(30)
        b_runs = [await submit(h, "bob") for _ in range(10)]
        await pool.settle()
        for _ in range(3):
            await pool.advance(61)
        assert len(pool.running(ids(a_runs))) == 4 and not pool.running(ids(b_runs))
        assert stops(agent) == []
        assert walks[0] == 0 and reads[0] == 0
        # That the check still preempts once an interruptible job runs: the other tests of this file.


async def test_a_reservation_preempts_interruptible_jobs_on_the_reserved_host_only(tmp_path: Path) -> None:
    reserve_after = 120.0
    async with (
        coordinator(tmp_path, lease_timeout_s=NO_LEASES, reserve_after_s=reserve_after, preempt_after_s=math.inf) as h,
        sim_agent(h, "gpu-1", gpus=8) as one,
        sim_agent(h, "gpu-2", gpus=8) as two,
    ):
        await add_users(h)
        pool = Pool(h, one, two)
        flood = [await submit(h, "alice", interruptible=True) for _ in range(24)]  # 16 run, 8 wait
        await pool.settle()
        assert len(pool.running(ids(flood))) == 16
        big = await submit(h, "carol", gpus=8, workflow="big")
        await pool.settle()
        await pool.advance(reserve_after - 10)
        assert stops(one, two) == []
        await pool.advance(15)
        await one.until(lambda: len(stops(one, two)) >= 8, "the reserved host's jobs to be preempted")
        engine = h.coordinator.engine
        held = engine.reservations.get(big.jobs[0].id) or engine.preempted_for.get(big.jobs[0].id)
        host, other = (one, two) if held == one.name or stops(one) else (two, one)
        assert len(stops(host)) == 8 and stops(other) == []  # the fewest that let it start: all 8, on one host
        await stop_what_was_asked(pool, set())
        assert pool.running(ids([big]))
        big_on = next(a for a in pool.agents if any(x.job_id == big.jobs[0].id for x in a.assignments()))
        assert big_on is host
        # None of the requeued attempts went back onto the host ahead of the big job.
        requeued = [x.job_id for x in host.assignments() if x.job_id.endswith("-a2")]
        assert requeued == []
        job = await job_of(h, next(r for r in flood if r.jobs[0].id in stops(host)))
        assert (
            job.attempt == 2 and job.attempts[0].message == f"preempted for carol's job {big.name}/main (reservation)"
        )


@pytest.mark.parametrize("margin", [2.0, 1.0])
async def test_two_users_with_close_usage_never_preempt_each_other(tmp_path: Path, margin: float) -> None:
    """Alice starts 50 s before bob: her usage/share stays within a factor of 2 of his, so with the
    default margin nobody is preempted over 40 minutes of passes; with no margin (1.0), bob takes one of
    her GPUs as soon as he has waited --preempt-after (the ping-pong the margin prevents)."""
    # Fair share alone (no reservations: a job waiting past --reserve-after preempts whoever it needs to).
    async with (
        coordinator(
            tmp_path,
            lease_timeout_s=NO_LEASES,
            preempt_after_s=60,
            preempt_min_run_s=60,
            preempt_margin=margin,
            reserve_after_s=math.inf,
        ) as h,
        sim_agent(h, "gpu-1", gpus=4) as agent,
    ):
        await add_users(h)
        pool = Pool(h, agent)
        # Each user holds two GPUs with interruptible jobs and waits with more that are not.
        runs = {"alice": [await submit(h, "alice", interruptible=True) for _ in range(2)]}
        await pool.settle()
        await pool.advance(50)
        runs["bob"] = [await submit(h, "bob", interruptible=True) for _ in range(2)]
        await pool.settle()
        more = {u: [await submit(h, u) for _ in range(4)] for u in runs}
        await pool.settle()
        assert all(len(pool.running(ids(runs[u]))) == 2 for u in runs)
        if margin == 1.0:
            await pool.advance(61)
            await agent.until(lambda: stops(agent), "bob's preemption of one of alice's jobs")
            assert stops(agent)[0] in ids(runs["alice"])
            return
        for _ in range(40):  # many passes and preemption checks: 40 minutes
            await pool.advance(60)
        assert stops(agent) == []
        assert all(len(pool.running(ids(runs[u]))) == 2 for u in runs)
        assert not any(pool.running(ids(more[u])) for u in runs)


async def test_a_user_at_quota_cannot_get_others_jobs_preempted_to_idle_a_host(tmp_path: Path) -> None:
    """The attack: bob, at his GPU quota, waits with one more job: were it served, alice's job would be
    killed and its GPU held for a job the quota will not let start."""
    async with (
        coordinator(
            tmp_path, lease_timeout_s=NO_LEASES, preempt_after_s=60, preempt_min_run_s=60, reserve_after_s=120
        ) as h,
        sim_agent(h, "gpu-1", gpus=4) as agent,
    ):
        await add_users(h)
        await h.client.SetUserLimits(client_pb2.SetUserLimitsRequest(name="bob", max_gpus=1), metadata=h.meta)
        pool = Pool(h, agent)
        a_runs = [await submit(h, "alice", interruptible=True) for _ in range(3)]
        held = await submit(h, "bob")
        await pool.settle()
        assert len(pool.running(ids([*a_runs, held]))) == 4
        more = await submit(h, "bob")
        for _ in range(6):
            await pool.advance(60)
        assert stops(agent) == []
        job = await job_of(h, more)
        assert job.wait_reason == "quota" and not h.coordinator.engine.preempted_for
