"""The preemption policy (coordinator/preemption.py choose), pure: who is preempted for whom."""

from __future__ import annotations

import copy
import math
from itertools import combinations

from hypothesis import given, settings
from hypothesis import strategies as st

from dstack.coordinator.planner import UserLimits
from dstack.coordinator.preemption import FAIR_SHARE, RESERVATION, Preemption, Rules, RunningJob, choose, key
from dstack.coordinator.scheduler import AgentState, Gpu, JobRequest, _fits

NS = 1_000_000_000
NOW = 10_000 * NS


def agent(agent_id: str, gpus: int = 4, cpu: float = 32) -> AgentState:
    return AgentState(agent_id, agent_id, cpu, 64 << 30, [Gpu(i, "A100", 80 << 30) for i in range(gpus)], 100)


def fill(agents: list[AgentState], jobs: list[RunningJob]) -> list[AgentState]:
    by_id = {a.agent_id: a for a in agents}
    for j in jobs:
        a = by_id[j.agent_id]
        a.used_cpu += j.cpu
        a.used_memory += j.memory
        a.busy_gpus.update(j.gpu_indices)
        a.jobs += 1
    return agents


def job(
    job_id: str, agent_id: str, gpus: tuple[int, ...], owner: str, interruptible: bool = True, ran_s: float = 600
) -> RunningJob:
    return RunningJob(job_id, agent_id, 1.0, 0, gpus, interruptible, False, owner, NOW - int(ran_s * NS))


def waiting(job_id: str, owner: str, gpus: int = 1, waited_s: float = 120) -> JobRequest:
    return JobRequest(job_id, cpu=1, gpu_count=gpus, owner=owner, submitted_at=NOW - int(waited_s * NS))


def rules(**kw: object) -> Rules:
    base: dict[str, object] = {"now_ns": NOW, "reserve_after_s": math.inf, "preempt_after_s": 60.0}
    base.update(kw)
    return Rules(**base)  # type: ignore[arg-type]


def alice_fills_four_gpus(interruptible: bool = True) -> tuple[list[AgentState], list[RunningJob]]:
    jobs = [job(f"a{i}", "gpu-1", (i,), "alice", interruptible) for i in range(4)]
    return fill([agent("gpu-1")], jobs), jobs


def test_a_user_below_fair_share_gets_one_interruptible_job_of_a_user_above_it() -> None:
    agents, jobs = alice_fills_four_gpus()
    got = choose([waiting("b1", "bob")], agents, jobs, rules(usage={"alice": 2400.0}))
    assert got == Preemption("b1", "bob", FAIR_SHARE, ("a0",), "gpu-1")


def test_never_a_job_that_is_not_interruptible() -> None:
    agents, jobs = alice_fills_four_gpus(interruptible=False)
    assert choose([waiting("b1", "bob")], agents, jobs, rules(usage={"alice": 2400.0})) is None


def test_never_for_the_same_user_by_fair_share() -> None:
    agents, jobs = alice_fills_four_gpus()
    assert choose([waiting("a9", "alice")], agents, jobs, rules(usage={"alice": 2400.0})) is None


def test_not_before_preempt_after_nor_a_job_in_its_minimum_run_time() -> None:
    agents, jobs = alice_fills_four_gpus()
    r = rules(usage={"alice": 2400.0})
    assert choose([waiting("b1", "bob", waited_s=59)], agents, jobs, r) is None
    young = [job(f"a{i}", "gpu-1", (i,), "alice", ran_s=30) for i in range(4)]
    assert choose([waiting("b1", "bob")], agents, young, r) is None


def test_equal_users_never_preempt_each_other_within_the_margin() -> None:
    # alice and bob hold two GPUs each, with usage within a factor of 2: neither preempts the other.
    jobs = [job("a0", "gpu-1", (0,), "alice"), job("a1", "gpu-1", (1,), "alice")]
    jobs += [job("b0", "gpu-1", (2,), "bob"), job("b1", "gpu-1", (3,), "bob")]
    agents = fill([agent("gpu-1")], jobs)
    for usage in ({"alice": 1000.0, "bob": 1000.0}, {"alice": 1900.0, "bob": 1000.0}, {"alice": 1000.0, "bob": 1990.0}):
        r = rules(usage=usage)
        assert choose([waiting("a9", "alice"), waiting("b9", "bob")], agents, jobs, r) is None
    # Past the margin the user further below their share gets one.
    got = choose(
        [waiting("a9", "alice"), waiting("b9", "bob")], agents, jobs, rules(usage={"alice": 2100.0, "bob": 1000.0})
    )
    assert got is not None and got.for_owner == "bob" and set(got.victims) <= {"a0", "a1"} and len(got.victims) == 1


def test_shares_weigh_usage() -> None:
    agents, jobs = alice_fills_four_gpus()
    # bob used half of alice's but his share is a quarter of hers: he is above his fair share.
    r = rules(usage={"alice": 2000.0, "bob": 1000.0}, shares={"alice": 4.0, "bob": 1.0})
    assert choose([waiting("b1", "bob")], agents, jobs, r) is None
    assert key(r, "bob") == 1000.0 and key(r, "alice") == 500.0


def test_a_reservation_preempts_only_on_the_reserved_host_the_fewest_that_let_it_start() -> None:
    on_1 = [job(f"h1-{i}", "gpu-1", (i,), "alice") for i in range(8)]
    on_2 = [job(f"h2-{i}", "gpu-2", (i,), "alice") for i in range(8)]
    agents = fill([agent("gpu-1", gpus=8), agent("gpu-2", gpus=8)], on_1 + on_2)
    r = rules(reserve_after_s=300.0, preempt_after_s=math.inf, reservations={"carol-8": "gpu-2"})
    assert choose([waiting("carol-8", "carol", gpus=8, waited_s=299)], agents, on_1 + on_2, r) is None
    got = choose([waiting("carol-8", "carol", gpus=8, waited_s=301)], agents, on_1 + on_2, r)
    assert got is not None and got.cause == RESERVATION and got.agent_id == "gpu-2"
    assert sorted(got.victims) == sorted(j.job_id for j in on_2)


def test_a_job_its_owners_quota_holds_back_preempts_nobody() -> None:
    # bob already holds a GPU elsewhere and may hold one: freeing a GPU for his second job would leave it idle.
    jobs = [job(f"a{i}", "gpu-1", (i,), "alice") for i in range(4)] + [job("b0", "gpu-2", (0,), "bob", False)]
    agents = fill([agent("gpu-1"), agent("gpu-2", gpus=1)], jobs)
    r = rules(usage={"alice": 2400.0}, reserve_after_s=60.0, limits={"bob": UserLimits(max_gpus=1)})
    assert choose([waiting("b1", "bob", waited_s=400)], agents, jobs, r) is None
    r = rules(usage={"alice": 2400.0}, reserve_after_s=60.0, limits={"bob": UserLimits(max_gpus=2)})
    assert choose([waiting("b1", "bob", waited_s=400)], agents, jobs, r) is not None


def test_a_job_waiting_for_its_victims_to_stop_takes_no_more() -> None:
    agents, jobs = alice_fills_four_gpus()
    stopping = [RunningJob(**{**j.__dict__, "being_preempted": j.job_id == "a0"}) for j in jobs]
    assert choose([waiting("b1", "bob")], agents, stopping, rules(usage={"alice": 2400.0})) is None


# ---- properties ---------------------------------------------------------------------------------
USERS = ["alice", "bob", "carol"]


@st.composite
def snapshots(draw: st.DrawFn) -> tuple[list[AgentState], list[RunningJob], list[JobRequest], Rules]:
    agents = [agent(f"gpu-{i}", gpus=draw(st.integers(1, 8)), cpu=16) for i in range(draw(st.integers(1, 3)))]
    jobs: list[RunningJob] = []
    for a in agents:
        free = list(range(len(a.gpus)))
        while free and draw(st.integers(0, 5)) > 0:  # mostly full: that is when preemption matters
            n = draw(st.integers(1, min(2, len(free))))
            gpus, free = tuple(free[:n]), free[n:]
            jobs.append(
                RunningJob(
                    f"j{len(jobs)}",
                    a.agent_id,
                    draw(st.sampled_from([0.0, 1.0, 4.0])),
                    0,
                    gpus,
                    draw(st.integers(0, 3)) > 0,  # interruptible
                    draw(st.integers(0, 5)) == 0,  # being preempted
                    draw(st.sampled_from(USERS)),
                    draw(st.sampled_from([0, NOW - 30 * NS, NOW - 600 * NS, NOW - 900 * NS])),
                )
            )
    fill(agents, jobs)
    reqs = [
        JobRequest(
            f"w{i}",
            cpu=draw(st.sampled_from([0.0, 1.0, 8.0])),
            gpu_count=draw(st.integers(0, 4)),
            owner=draw(st.sampled_from(USERS)),
            submitted_at=NOW - draw(st.sampled_from([10, 90, 400, 400])) * NS,
        )
        for i in range(draw(st.integers(1, 4)))
    ]
    r = Rules(
        now_ns=NOW,
        reserve_after_s=draw(st.sampled_from([300.0, math.inf])),
        preempt_after_s=draw(st.sampled_from([60.0, math.inf])),
        margin=draw(st.sampled_from([1.0, 2.0])),
        usage={u: draw(st.sampled_from([0.0, 100.0, 1000.0, 5000.0])) for u in USERS},
        shares={u: draw(st.sampled_from([1.0, 2.0])) for u in USERS},
        reservations={reqs[0].job_id: agents[0].agent_id} if draw(st.booleans()) else {},
        limits={u: UserLimits(max_gpus=draw(st.sampled_from([0, 2, 4]))) for u in USERS},
    )
    return agents, jobs, reqs, r


def _release_all(a: AgentState, jobs: list[RunningJob]) -> AgentState:
    a = copy.deepcopy(a)
    for j in jobs:
        a.used_cpu -= j.cpu
        a.used_memory -= j.memory
        a.busy_gpus.difference_update(j.gpu_indices)
        a.jobs -= 1
    return a


@settings(max_examples=1000, deadline=None)
@given(snapshots())
def test_choose_never_breaks_the_rules(
    snap: tuple[list[AgentState], list[RunningJob], list[JobRequest], Rules],
) -> None:
    agents, jobs, reqs, r = snap
    got = choose(reqs, agents, jobs, r)
    if got is None:
        return
    by_id = {j.job_id: j for j in jobs}
    victims = [by_id[v] for v in got.victims]
    req = next(q for q in reqs if q.job_id == got.for_job)
    # Only interruptible jobs past their minimum run time, not already stopping, all on one agent.
    assert all(v.interruptible and not v.being_preempted and v.started_ns > 0 for v in victims)
    assert all(r.now_ns - v.started_ns >= r.min_run_s * NS for v in victims)
    assert {v.agent_id for v in victims} == {got.agent_id}
    # Its owner's quota lets it start.
    held = sum(len(j.gpu_indices) for j in jobs if j.owner == req.owner)
    cap = r.limits[req.owner].max_gpus
    assert not cap or not req.gpu_count or held + req.gpu_count <= cap
    if got.cause == FAIR_SHARE:
        assert all(v.owner != req.owner for v in victims)  # never for the same user
        assert all(key(r, v.owner) > r.margin * key(r, req.owner) for v in victims)
        assert (r.now_ns - req.submitted_at) / NS >= r.preempt_after_s
    else:
        assert (r.now_ns - req.submitted_at) / NS >= r.reserve_after_s
        if req.job_id in r.reservations:
            assert got.agent_id == r.reservations[req.job_id]
    # Needed: the job fits nowhere now (jobs already stopping counted as gone), and it fits once they go.
    stopping = [j for j in jobs if j.being_preempted]
    now = {a.agent_id: _release_all(a, [j for j in stopping if j.agent_id == a.agent_id]) for a in agents}
    assert all(_fits(a, req) is None for a in now.values())
    host = now[got.agent_id]
    assert _fits(_release_all(host, victims), req) is not None
    # Never more than needed: no set of one job fewer lets it fit there (victims or not: the candidates
    # on an agent here are few enough to be tried exhaustively).
    assert all(_fits(_release_all(host, list(fewer)), req) is None for fewer in combinations(victims, len(victims) - 1))
    others = [
        j
        for j in jobs
        if j.agent_id == got.agent_id
        and j.interruptible
        and not j.being_preempted
        and j.started_ns > 0
        and r.now_ns - j.started_ns >= r.min_run_s * NS
        and (got.cause != FAIR_SHARE or (j.owner != req.owner and key(r, j.owner) > r.margin * key(r, req.owner)))
    ]
    assert len(victims) == 1 or all(_fits(_release_all(host, [j]), req) is None for j in others)


def test_coordinator_options(tmp_path: object) -> None:
    import pytest

    from dstack.coordinator.main import parse_args

    base = ["--state-dir", str(tmp_path)]
    cfg = parse_args(base)
    assert (cfg.preempt_after_s, cfg.preempt_min_run_s, cfg.preempt_margin) == (60.0, 60.0, 2.0)
    cfg = parse_args([*base, "--preempt-after", "off", "--preempt-min-run", "300", "--preempt-margin", "1.5"])
    assert (math.isinf(cfg.preempt_after_s), cfg.preempt_min_run_s, cfg.preempt_margin) == (True, 300.0, 1.5)
    for bad in (["--preempt-margin", "0.5"], ["--preempt-min-run", "-1"]):
        with pytest.raises(SystemExit):
            parse_args([*base, *bad])
