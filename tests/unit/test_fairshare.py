"""The pure parts of fair share: decay arithmetic, the order, quotas, reservations, wait reasons, estimates."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from dstack.coordinator.fairshare import Accumulator, interval_usage, weight
from dstack.coordinator.planner import (
    FAIR_SHARE,
    NEVER_FITS,
    QUOTA,
    RESERVATION,
    RESOURCES,
    Policy,
    RunningJob,
    UserLimits,
    order,
    plan,
)
from dstack.coordinator.scheduler import AgentState, Gpu, JobRequest

NS = 1_000_000_000
DAY = 86400.0


def gpu_agent(name: str, gpus: int = 8, busy: set[int] | None = None) -> AgentState:
    return AgentState(
        agent_id=name,
        name=name,
        cpu_total=64,
        memory_total=512 << 30,
        gpus=[Gpu(i, "H100", 80 << 30) for i in range(gpus)],
        max_jobs=100,
        busy_gpus=set(busy or ()),
        jobs=len(busy or ()),
    )


def job(job_id: str, owner: str, gpus: int = 1, at: float = 0.0, priority: int = 0) -> JobRequest:
    return JobRequest(
        job_id=job_id, gpu_count=gpus, owner=owner, priority=priority, submitted_at=int(at * NS), duration_key="w/main"
    )


def running(job_id: str, agent: str, owner: str, gpus: list[int], end_s: float | None) -> RunningJob:
    return RunningJob(job_id, agent, owner, 0.0, 0, tuple(gpus), 0, None if end_s is None else int(end_s * NS))


# ---- usage arithmetic ---------------------------------------------------------------------------------
def test_a_cpu_only_job_costs_its_cpus_over_eight_and_a_gpu_job_its_gpus() -> None:
    assert weight(2, 16.0) == 2.0
    assert weight(0, 8.0) == 1.0
    assert weight(0, 0.0) == 1 / 8  # no CPU asked: one CPU's worth (it takes a slot)


def test_usage_halves_every_half_life() -> None:
    one_hour = interval_usage(1.0, 0, 3600 * NS, 3600 * NS, DAY)
    assert 3500 < one_hour < 3600  # an hour-old second counts 2^(-1/24)
    later = interval_usage(1.0, 0, 3600 * NS, int((3600 + DAY) * NS), DAY)
    assert math.isclose(later, one_hour / 2, rel_tol=1e-9)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 1e5), st.floats(0, 1e4), st.floats(0.1, 8)), min_size=1, max_size=8),
    st.floats(60, 1e6),
)
def test_an_accumulator_charged_job_by_job_equals_charging_all_at_the_end(
    jobs: list[tuple[float, float, float]], half_life: float
) -> None:
    """Incremental (each job added when it ends, then decayed forward) = everything computed at once."""
    spans = sorted((s, s + d, w) for s, d, w in jobs)
    end = max(e for _, e, _ in spans) + 100
    acc = Accumulator()
    for s, e, w in sorted(spans, key=lambda x: x[1]):
        acc.add(interval_usage(w, int(s * NS), int(e * NS), int(e * NS), half_life), int(e * NS), half_life)
    direct = sum(interval_usage(w, int(s * NS), int(e * NS), int(end * NS), half_life) for s, e, w in spans)
    assert math.isclose(acc.at(int(end * NS), half_life), direct, rel_tol=1e-6, abs_tol=1e-6)


# ---- order --------------------------------------------------------------------------------------------
def test_fair_share_puts_the_user_with_less_usage_first_then_takes_turns() -> None:
    queue = [job(f"a{i}", "alice", at=i) for i in range(4)] + [job(f"b{i}", "bob", at=100 + i) for i in range(2)]
    policy = Policy(now_ns=0, usage={"alice": 1000.0, "bob": 0.0}, durations={"w/main": 600.0})
    ids = [r.job_id for r in order(queue, policy)]
    assert ids[0] == "b0"
    assert ids.index("b1") < ids.index("a1")  # bob's second job before alice's second
    assert [i for i in ids if i.startswith("a")] == ["a0", "a1", "a2", "a3"]  # her own order kept


def test_fair_share_off_is_first_come_first_served() -> None:
    queue = [job("b0", "bob", at=5), job("a0", "alice", at=1), job("a1", "alice", at=2)]
    policy = Policy(now_ns=0, fairshare=False, usage={"alice": 1e9})
    assert [r.job_id for r in order(queue, policy)] == ["a0", "a1", "b0"]


def test_a_users_priority_orders_only_their_own_jobs() -> None:
    queue = [job("a-low", "alice", at=1), job("a-high", "alice", at=2, priority=10), job("b0", "bob", at=3)]
    policy = Policy(now_ns=0, usage={"alice": 0.0, "bob": 50.0})
    ids = [r.job_id for r in order(queue, policy)]
    assert ids.index("a-high") < ids.index("a-low")
    assert ids[0] == "a-high"  # alice has less usage; her highest priority job comes first


def test_a_bigger_share_counts_the_same_usage_as_less() -> None:
    queue = [job("a0", "alice"), job("b0", "bob")]
    limits = {"bob": UserLimits(share=4.0)}
    policy = Policy(now_ns=0, usage={"alice": 100.0, "bob": 300.0}, limits=limits)
    assert order(queue, policy)[0].job_id == "b0"  # 300 / 4 < 100 / 1


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(-2, 2), st.integers(0, 100)), min_size=1, max_size=40
    ),
    st.booleans(),
)
def test_the_order_is_a_permutation_that_keeps_each_users_own_order(
    specs: list[tuple[str, int, int]], fairshare: bool
) -> None:
    queue = [job(f"j{i}", u, at=t, priority=p) for i, (u, p, t) in enumerate(specs)]
    out = order(queue, Policy(now_ns=0, fairshare=fairshare, usage={"a": 10.0, "b": 0.0}))
    assert sorted(r.job_id for r in out) == sorted(r.job_id for r in queue)
    for user in "abc":
        mine = [r for r in out if r.owner == user]
        assert mine == sorted(mine, key=lambda r: (-r.priority, r.submitted_at, int(r.job_id[1:])))


# ---- a pass -------------------------------------------------------------------------------------------
def test_the_user_below_fair_share_gets_the_free_gpu_and_the_other_waits_for_fair_share() -> None:
    agents = [gpu_agent("host-1", busy=set(range(7)))]
    runs = [running(f"r{i}", "host-1", "alice", [i], 60) for i in range(7)]
    queue = [job("a8", "alice", at=1), job("b0", "bob", at=2), job("b1", "bob", at=3)]
    p = plan(queue, agents, runs, Policy(now_ns=0, usage={"alice": 5000.0}, durations={"w/main": 60.0}))
    assert [pl[0] for pl in p.placements] == ["b0"]
    assert p.info["b1"].position == 1 and p.info["b1"].reason == RESOURCES
    assert p.info["a8"].position == 2 and p.info["a8"].reason == FAIR_SHARE
    # Both start as the running jobs end (60 s), one GPU each.
    assert p.info["b1"].eta_ns == 60 * NS and p.info["a8"].eta_ns == 60 * NS


def test_a_user_at_quota_waits_with_reason_quota_while_others_are_placed() -> None:
    agents = [gpu_agent("host-1", busy={0, 1})]
    runs = [running("r0", "host-1", "alice", [0], None), running("r1", "host-1", "alice", [1], None)]
    policy = Policy(now_ns=0, limits={"alice": UserLimits(max_gpus=2)})
    p = plan([job("a2", "alice"), job("b0", "bob")], agents, runs, policy)
    assert [pl[0] for pl in p.placements] == ["b0"]
    assert p.info["a2"].reason == QUOTA and "2 of at most 2 GPUs" in p.info["a2"].message
    policy = Policy(now_ns=0, limits={"alice": UserLimits(max_running=2)})
    p = plan([job("a2", "alice")], [gpu_agent("host-1", busy={0, 1})], runs, policy)
    assert p.info["a2"].reason == QUOTA and "runs 2 of at most 2 jobs" in p.info["a2"].message


def test_a_big_job_that_waited_long_reserves_the_host_that_drains_first_and_small_jobs_go_elsewhere() -> None:
    agents = [gpu_agent("host-1", busy=set(range(8))), gpu_agent("host-2", busy=set(range(7)))]
    runs = [running(f"x{i}", "host-1", "alice", [i], 400 + i) for i in range(8)]  # drains at 407 s
    runs += [running(f"y{i}", "host-2", "alice", [i], 900) for i in range(7)]  # drains at 900 s
    queue = [job("big", "carol", gpus=8, at=0), job("small", "alice", at=1), job("small2", "alice", at=2)]
    policy = Policy(now_ns=301 * NS, reserve_after_s=300, durations={"w/main": 60.0})
    p = plan(queue, agents, runs, policy)
    assert p.reservations == {"big": "host-1"}
    assert p.info["big"].reason == RESERVATION and p.info["big"].message == "reserved host-1, draining 8 jobs"
    assert p.info["big"].eta_ns == 407 * NS
    assert [pl[:2] for pl in p.placements] == [("small", "host-2")]  # never onto host-1
    # host-1's jobs end: its GPUs free up, but only the reserved job may take them.
    agents = [gpu_agent("host-1", busy=set()), gpu_agent("host-2", busy=set(range(8)))]
    runs2 = [running(f"y{i}", "host-2", "alice", [i], 900) for i in range(8)]
    queue2 = [job("small2", "alice", at=2), job("big", "carol", gpus=8, at=0)]
    p = plan(queue2, agents, runs2, Policy(now_ns=410 * NS, reserve_after_s=300, reservations=p.reservations))
    assert [pl[:2] for pl in p.placements] == [("big", "host-1")]
    assert p.reservations == {}


def test_a_reserved_host_keeps_small_jobs_off_it_and_says_so() -> None:
    agents = [gpu_agent("host-1", busy={0, 1})]
    runs = [running("x0", "host-1", "alice", [0], 50), running("x1", "host-1", "alice", [1], 70)]
    queue = [job("small", "alice", at=500), job("big", "carol", gpus=8, at=0)]
    p = plan(queue, agents, runs, Policy(now_ns=400 * NS, reserve_after_s=300))
    assert not p.placements
    assert p.info["big"].message == "reserved host-1, draining 2 jobs"
    assert p.info["small"].reason == RESERVATION and "host-1 reserved" in p.info["small"].message


def test_no_reservation_before_reserve_after_or_when_every_waiting_job_is_the_same_size() -> None:
    agents = [gpu_agent("host-1", busy=set(range(8)))]
    runs = [running(f"x{i}", "host-1", "alice", [i], 100) for i in range(8)]
    queue = [job("big", "carol", gpus=8, at=0), job("small", "alice", at=1)]
    assert plan(queue, agents, runs, Policy(now_ns=299 * NS, reserve_after_s=300)).reservations == {}
    same = [job("a", "alice", at=0), job("b", "bob", at=1)]
    assert plan(same, agents, runs, Policy(now_ns=9999 * NS, reserve_after_s=300)).reservations == {}


def test_a_job_no_agent_can_ever_fit_says_so() -> None:
    p = plan([job("huge", "alice", gpus=16)], [gpu_agent("host-1")], [], Policy(now_ns=0))
    assert p.info["huge"].reason == NEVER_FITS and "the largest agent has 8 GPUs" in p.info["huge"].message
    assert "huge" in p.impossible


def test_the_estimate_is_unknown_when_nothing_running_has_an_expected_end() -> None:
    agents = [gpu_agent("host-1", busy=set(range(8)))]
    runs = [running(f"x{i}", "host-1", "alice", [i], None) for i in range(8)]
    p = plan([job("a", "bob")], agents, runs, Policy(now_ns=0))
    assert p.info["a"].eta_ns == 0 and p.info["a"].position == 1


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(1, 8), st.integers(0, 600)), min_size=1, max_size=30),
    st.sets(st.integers(0, 7), max_size=8),
    st.booleans(),
)
def test_a_pass_never_overcommits_and_every_job_is_placed_or_explained(
    specs: list[tuple[str, int, int]], busy: set[int], fairshare: bool
) -> None:
    agents = [gpu_agent("host-1", busy=busy), gpu_agent("host-2")]
    runs = [running(f"x{i}", "host-1", "a", [i], 100 + i) for i in sorted(busy)]
    queue = [job(f"j{i}", u, gpus=g, at=t) for i, (u, g, t) in enumerate(specs)]
    limits = {"b": UserLimits(max_gpus=6)}
    p = plan(queue, agents, runs, Policy(now_ns=700 * NS, fairshare=fairshare, limits=limits))
    used: dict[str, set[int]] = {"host-1": set(busy), "host-2": set()}
    for _, agent, gpus in p.placements:
        assert not used[agent] & set(gpus)
        used[agent] |= set(gpus)
    placed = {pl[0] for pl in p.placements}
    assert placed | set(p.info) == {r.job_id for r in queue} and not placed & set(p.info)
    assert sorted(i.position for i in p.info.values()) == list(range(1, len(p.info) + 1))
    b_gpus = sum(r.gpu_count for r in queue if r.owner == "b" and r.job_id in placed)
    assert b_gpus <= 6
    for job_id, agent in p.reservations.items():
        assert all(a != agent for j, a, _ in p.placements if j != job_id)


def test_a_big_job_held_back_by_its_owners_quota_reserves_nothing() -> None:
    agents = [gpu_agent("host-1", busy=set(range(8)))]
    runs = [running(f"x{i}", "host-1", "carol", [i], 400 + i) for i in range(8)]
    queue = [job("big", "carol", gpus=8, at=0), job("small", "alice", at=1)]
    limits = {"carol": UserLimits(max_gpus=8)}
    p = plan(queue, agents, runs, Policy(now_ns=301 * NS, reserve_after_s=300, limits=limits))
    assert p.reservations == {} and p.info["big"].reason == QUOTA


def test_a_huge_priority_does_not_jump_ahead_of_other_users() -> None:
    """--priority orders only its owner's jobs: a heavy user cannot buy their way past fair share."""
    queue = [job("b0", "bob", at=5), job("a0", "alice", at=1, priority=1_000_000)]
    policy = Policy(now_ns=0, usage={"alice": 5000.0, "bob": 10.0})
    assert [r.job_id for r in order(queue, policy)] == ["b0", "a0"]


def test_a_job_over_quota_is_expected_when_its_owners_first_job_ends() -> None:
    agents = [gpu_agent("host-1", busy={0})]
    runs = [running("r0", "host-1", "alice", [0], 90)]
    p = plan([job("a1", "alice")], agents, runs, Policy(now_ns=0, limits={"alice": UserLimits(max_running=1)}))
    assert p.info["a1"].reason == QUOTA and p.info["a1"].eta_ns == 90 * NS  # not "now", though GPUs are free
