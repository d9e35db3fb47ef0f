"""Fair share, quotas, priorities, reservations and queue estimates through the real coordinator.

Agents are SimAgents with simulated GPUs; time is the manual clock, so "a job ran 60 s" is a step the
test takes. Jobs end when the test reports them done.
"""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest

from dstack.protos.v1 import client_pb2, common_pb2
from tests.inproc.factories import JS, TR, Harness, SimAgent, coordinator, sim_agent, wait_until

pytestmark = pytest.mark.inproc

TOKENS = {"alice": "tok-alice", "bob": "tok-bob", "carol": "tok-carol"}
JOB_S = 60.0  # how long each test job runs
NO_LEASES = 1e6  # SimAgents send no heartbeats: steps of the clock must not make them lost


async def add_users(h: Harness) -> None:
    engine = h.coordinator.engine
    for name, token in TOKENS.items():
        await engine.db(engine.store.ensure_user, name, token, "member")


def meta(user: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS[user]}")]


async def submit(h: Harness, user: str, gpus: int = 1, priority: int = 0, workflow: str = "train") -> client_pb2.Run:
    spec = common_pb2.JobSpec(
        job_name="main",
        workflow=workflow,
        provider="bash",
        commands=["true"],
        resources=common_pb2.Resources(gpu=common_pb2.GpuRequest(count=gpus)),
    )
    req = client_pb2.SubmitRunRequest(workflow=workflow, jobs=[spec], priority=priority)
    resp: client_pb2.SubmitRunResponse = await h.client.SubmitRun(req, metadata=meta(user))
    return resp.run


class Pool:
    """The test's agents: it starts what the coordinator assigns and ends what the test says."""

    def __init__(self, h: Harness, *agents: SimAgent) -> None:
        self.h, self.agents = h, agents
        self.started: dict[str, float] = {}  # job id -> when it started (seconds on the test's clock)
        self.finished: set[str] = set()
        self.now = 0.0

    async def settle(self) -> None:
        """Until the coordinator has no pass to make and every assignment it sent is running."""
        engine = self.h.coordinator.engine
        while True:
            await engine.settled()
            sent = engine.assignments_sent
            await wait_until(lambda n=sent: self._delivered(n), f"{sent} assignments delivered")  # type: ignore[misc]
            for a in self.agents:
                for asg in a.assignments():
                    if asg.job_id not in self.started:
                        self.started[asg.job_id] = self.now
                        await a.report(asg.job_id, JS.JOB_STATUS_RUNNING)
            await engine.settled()
            if engine.assignments_sent == sent:
                return

    async def _delivered(self, sent: int) -> bool:
        return sum(len(a.assignments()) for a in self.agents) >= sent

    async def advance(self, seconds: float) -> None:
        await self.h.clock.advance(seconds)
        self.now += seconds
        await self.settle()

    async def finish(self, job_id: str) -> None:
        agent = next(a for a in self.agents if any(x.job_id == job_id for x in a.assignments()))
        await agent.report(job_id, JS.JOB_STATUS_DONE, TR.TERMINATION_REASON_DONE)
        self.finished.add(job_id)
        await self.settle()

    def running(self, job_ids: list[str]) -> list[str]:
        return [j for j in job_ids if j in self.started]


async def job_of(h: Harness, run: client_pb2.Run) -> client_pb2.Job:
    return (await h.run(run.name)).jobs[0]


def ids(runs: list[client_pb2.Run]) -> list[str]:
    return [r.jobs[0].id for r in runs]


async def test_b_submitting_after_a_flood_gets_the_next_free_gpu_within_one_job_duration(tmp_path: Path) -> None:
    async with coordinator(tmp_path, lease_timeout_s=NO_LEASES) as h, sim_agent(h, "gpu-1", gpus=4) as agent:
        await add_users(h)
        pool = Pool(h, agent)
        flood = [await submit(h, "alice") for _ in range(12)]
        await pool.settle()
        first = pool.running(ids(flood))
        assert len(first) == 4
        await pool.advance(JOB_S / 2)
        b_runs = [await submit(h, "bob") for _ in range(2)]
        await pool.settle()
        waiting = await job_of(h, b_runs[0])
        assert waiting.status == JS.JOB_STATUS_PENDING and waiting.queue_position == 1
        a_next = await job_of(h, flood[4])
        # Behind bob's first: within one pass, bob's first job counts as used for its expected duration
        # (unknown yet: an hour), so alice's next job comes before bob's second in this pass's order.
        assert a_next.wait_reason == "fair-share" and a_next.queue_position == 2
        await pool.advance(JOB_S / 2)  # A's first jobs end one job duration after they started
        await pool.finish(first[0])
        assert pool.running(ids(b_runs)) == [b_runs[0].jobs[0].id]
        assert pool.started[b_runs[0].jobs[0].id] - JOB_S / 2 <= JOB_S
        await pool.finish(first[1])
        assert pool.running(ids(b_runs)) == ids(b_runs)  # bob's second before any more of alice's
        assert len(pool.running(ids(flood))) == 4


async def test_fair_share_off_serves_first_come_first_served(tmp_path: Path) -> None:
    async with (
        coordinator(tmp_path, lease_timeout_s=NO_LEASES, fairshare=False) as h,
        sim_agent(h, "gpu-1", gpus=2) as agent,
    ):
        await add_users(h)
        pool = Pool(h, agent)
        flood = [await submit(h, "alice") for _ in range(4)]
        await pool.settle()
        b = await submit(h, "bob")
        await pool.settle()
        assert (await job_of(h, b)).queue_position == 3 and (await job_of(h, b)).wait_reason == "resources"
        await pool.finish(flood[0].jobs[0].id)
        assert pool.running(ids(flood)) == ids(flood)[:3] and not pool.running(ids([b]))


async def test_a_big_job_gets_a_host_reserved_after_reserve_after_and_starts_once_it_drains(tmp_path: Path) -> None:
    reserve_after = 120.0
    async with (
        coordinator(tmp_path, lease_timeout_s=NO_LEASES, reserve_after_s=reserve_after) as h,
        sim_agent(h, "gpu-1", gpus=4) as agent,
    ):
        await add_users(h)
        pool = Pool(h, agent)
        flood = [await submit(h, "alice") for _ in range(30)]
        await pool.settle()
        big = await submit(h, "carol", gpus=4, workflow="big")
        submitted = pool.now
        # Alice's jobs end one at a time, each replaced at once: 4 GPUs are never free together.
        ends = {j: pool.started[j] + JOB_S + i * 15 for i, j in enumerate(pool.running(ids(flood)))}
        reserved_seen = False
        while not pool.running(ids([big])):
            assert pool.now - submitted <= reserve_after + JOB_S + 45, "the big job did not start in time"
            due = min(ends.values())
            await pool.advance(max(due - pool.now, 0.0))
            for j in [j for j, t in ends.items() if t <= pool.now]:
                del ends[j]
                await pool.finish(j)
            for j in pool.running(ids(flood)):
                if j not in ends and j not in pool.finished:
                    ends[j] = pool.started[j] + JOB_S
            job = await job_of(h, big)
            if job.wait_reason == "reservation":
                assert pool.now - submitted >= reserve_after
                assert job.message.startswith("reserved gpu-1, draining ")
                reserved_seen = True
        assert reserved_seen
        waited = pool.started[big.jobs[0].id] - submitted
        assert reserve_after <= waited <= reserve_after + JOB_S


async def test_a_user_at_quota_waits_with_reason_quota_and_only_an_admin_sets_quotas(tmp_path: Path) -> None:
    async with coordinator(tmp_path, lease_timeout_s=NO_LEASES) as h, sim_agent(h, "gpu-1", gpus=4) as agent:
        await add_users(h)
        pool = Pool(h, agent)
        # A member may not raise anyone's quota, their own included.
        attack = client_pb2.SetUserLimitsRequest(name="alice", max_gpus=100, share=100)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await h.client.SetUserLimits(attack, metadata=meta("alice"))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "admin" in str(refused.value.details())
        for bad in (
            client_pb2.SetUserLimitsRequest(name="alice", share=0),
            client_pb2.SetUserLimitsRequest(name="alice", share=math.nan),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await h.client.SetUserLimits(bad, metadata=h.meta)
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await h.client.SetUserLimits(client_pb2.SetUserLimitsRequest(name="mallory", max_gpus=1), metadata=h.meta)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        resp = await h.client.SetUserLimits(client_pb2.SetUserLimitsRequest(name="alice", max_gpus=2), metadata=h.meta)
        assert (resp.user.max_gpus, resp.user.share, resp.user.max_running) == (2, 1.0, 0)
        runs = [await submit(h, "alice") for _ in range(3)]
        await pool.settle()
        assert len(pool.running(ids(runs))) == 2
        third = await job_of(h, runs[2])
        assert third.wait_reason == "quota" and third.message == "quota: alice holds 2 of at most 2 GPUs"
        b = await submit(h, "bob")
        await pool.settle()
        assert pool.running(ids([b]))  # a free GPU goes to someone under quota
        resp = await h.client.SetUserLimits(
            client_pb2.SetUserLimitsRequest(name="alice", max_running=1), metadata=h.meta
        )
        assert (resp.user.max_gpus, resp.user.max_running) == (2, 1)  # what was not given is kept
        await pool.finish(runs[0].jobs[0].id)
        third = await job_of(h, runs[2])
        assert third.wait_reason == "quota" and third.message == "quota: alice runs 1 of at most 1 jobs"


async def test_priority_orders_a_users_own_jobs(tmp_path: Path) -> None:
    async with coordinator(tmp_path, lease_timeout_s=NO_LEASES) as h, sim_agent(h, "gpu-1", gpus=1) as agent:
        await add_users(h)
        pool = Pool(h, agent)
        blocker = await submit(h, "alice")
        await pool.settle()
        low = await submit(h, "alice", priority=-1)
        normal = await submit(h, "alice")
        high = await submit(h, "alice", priority=5)
        await pool.settle()
        positions = [(await job_of(h, r)).queue_position for r in (high, normal, low)]
        assert positions == [1, 2, 3]
        await pool.finish(blocker.jobs[0].id)
        assert pool.running(ids([low, normal, high])) == ids([high])
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await submit(h, "alice", priority=10**9)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_usage_decays_with_the_half_life_and_a_restart_keeps_it(tmp_path: Path) -> None:
    half_life = 600.0
    async with (
        coordinator(tmp_path, lease_timeout_s=NO_LEASES, fairshare_half_life_s=half_life) as h,
        sim_agent(h, "gpu-1", gpus=2) as agent,
    ):
        await add_users(h)
        pool = Pool(h, agent)
        run = await submit(h, "alice", gpus=2)
        await pool.settle()
        await pool.advance(JOB_S)
        await pool.finish(run.jobs[0].id)
        engine = h.coordinator.engine

        async def usage(user: str) -> float:
            accs = await engine.db(engine.store.usage_accumulators)
            return accs[user].at(h.clock.time_ns(), half_life) if user in accs else 0.0

        # Counted at the next pass: 2 GPUs x 60 s, barely decayed.
        await submit(h, "bob", gpus=2)
        await pool.settle()
        fresh = await usage("alice")
        assert 110 < fresh <= 120
        await pool.advance(half_life)
        assert math.isclose(await usage("alice"), fresh / 2, rel_tol=1e-6)
        before = await usage("alice")
        await h.stop()
        await h.start_again()
        engine = h.coordinator.engine
        assert math.isclose(await usage("alice"), before, rel_tol=1e-9)  # same clock instant, same usage
        await agent.connect(active=[])  # the agent comes back to the new coordinator


async def test_an_estimated_start_comes_from_the_running_jobs_expected_ends(tmp_path: Path) -> None:
    async with coordinator(tmp_path, lease_timeout_s=NO_LEASES) as h, sim_agent(h, "gpu-1", gpus=1) as agent:
        await add_users(h)
        pool = Pool(h, agent)
        first = await submit(h, "alice")
        await pool.settle()
        await pool.advance(JOB_S)
        await pool.finish(first.jobs[0].id)  # the workflow now has a known duration: 60 s
        second = await submit(h, "alice")
        await pool.settle()
        third = await submit(h, "alice")
        await pool.settle()
        job = await job_of(h, third)
        assert job.queue_position == 1 and job.wait_reason == "resources"
        # When the running job ends: it started now and the workflow's jobs take 60 s (to a microsecond:
        # the estimate is worked out in floating point).
        assert abs(job.eta_ns - (h.clock.time_ns() + int(JOB_S * 1e9))) < 1000
        assert pool.running(ids([second]))


async def test_a_job_failed_with_its_lost_agent_is_charged_for_the_time_it_ran(tmp_path: Path) -> None:
    async with coordinator(tmp_path, lease_timeout_s=30.0) as h, sim_agent(h, "gpu-1", gpus=1) as agent:
        await add_users(h)
        pool = Pool(h, agent)
        run = await submit(h, "alice")
        await pool.settle()
        await h.clock.advance(40.0)  # no heartbeat: the agent's lease runs out, its job fails
        await h.wait_job(run.name, "main", [JS.JOB_STATUS_FAILED])
        await submit(h, "bob")  # a pass (there is a job to place), which counts the failed job's usage
        engine = h.coordinator.engine
        await engine.settled()
        accs = await engine.db(engine.store.usage_accumulators)
        charged = accs["alice"].at(h.clock.time_ns(), engine.config.fairshare_half_life_s)
        assert 39.0 < charged <= 40.0  # 1 GPU from its start to the lease check that failed it
