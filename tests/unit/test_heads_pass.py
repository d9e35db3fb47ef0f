"""The heads-only scheduling pass (coordinator/planner.py `place_heads`) places exactly what the full
pass (`plan`) places, on random pools and queues: fair share on and off, priorities, quotas, carried
reservations, gangs, and jobs that `include` leaves out (blocked by their dependencies)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from dstack.coordinator.planner import (
    Policy,
    RunningJob,
    UserLimits,
    lazy_order,
    order,
    own_key,
    place_heads,
    plan,
    shape_of,
)
from dstack.coordinator.scheduler import AgentState, Gpu, JobRequest

GIB = 1 << 30


def _pool(rng: random.Random, n: int) -> tuple[list[AgentState], list[RunningJob]]:
    agents, running = [], []
    for i in range(n):
        gpus = [Gpu(k, rng.choice(["A100", "H100"]), rng.choice([40, 80]) * GIB) for k in range(rng.choice([0, 2, 4]))]
        a = AgentState(
            f"a{i}", f"n{i}", float(rng.choice([4, 8])), rng.choice([8, 16]) * GIB, gpus, rng.choice([1, 2, 4])
        )
        for j in range(rng.randrange(0, a.max_jobs + 1)):
            free = [g.index for g in gpus if g.index not in a.busy_gpus][: rng.randrange(0, 2)]
            if a.used_cpu + 1 > a.cpu_total:
                break
            a.hold(1.0, GIB, free)
            owner = rng.choice(["u0", "u1", "u2"])
            running.append(RunningJob(f"r{i}-{j}", a.agent_id, owner, 1.0, GIB, tuple(free), 0, None))
        agents.append(a)
    return agents, running


def _queue(rng: random.Random, n: int) -> list[JobRequest]:
    out = []
    gangs = 0
    i = 0
    while i < n:
        owner = rng.choice(["u0", "u1", "u2"])
        common = dict(
            cpu=float(rng.choice([0, 1, 2, 6])),
            memory=rng.choice([0, 1, 4, 20]) * GIB,
            gpu_count=rng.choice([0, 0, 1, 2, 4]),
            gpu_name=rng.choice(["", "", "h100"]),
            owner=owner,
            priority=rng.choice([0, 0, 1]),
            submitted_at=rng.randrange(0, 5),
            max_duration_s=rng.choice([None, 60.0]),
        )
        if rng.random() < 0.1:
            nn = rng.choice([2, 3])
            gangs += 1
            for r in range(nn):
                out.append(JobRequest(f"g{gangs}-{r}", gang=f"run/g{gangs}", nnodes=nn, node_rank=r, **common))  # type: ignore[arg-type]
            i += nn
            continue
        out.append(JobRequest(f"j{i}", avoid_agent=rng.choice(["", "a0"]), **common))  # type: ignore[arg-type]
        i += 1
    return out


def _copy(agents: list[AgentState]) -> list[AgentState]:
    return [
        AgentState(
            a.agent_id,
            a.name,
            a.cpu_total,
            a.memory_total,
            a.gpus,
            a.max_jobs,
            a.containers,
            a.used_cpu,
            a.used_memory,
            set(a.busy_gpus),
            a.jobs,
        )
        for a in agents
    ]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32), st.booleans())
def test_heads_place_what_the_full_pass_places(seed: int, fairshare: bool) -> None:
    rng = random.Random(seed)
    agents, running = _pool(rng, rng.randrange(0, 12))
    queue = _queue(rng, rng.randrange(0, 40))
    blocked = {r.job_id for r in queue if not r.gang and rng.random() < 0.1}
    kept = [r for r in queue if r.job_id not in blocked]
    ids = {r.job_id for r in kept if not r.gang}
    carried = (
        {j: f"a{rng.randrange(len(agents))}" for j in rng.sample(sorted(ids), min(len(ids), rng.randrange(0, 3)))}
        if agents
        else {}
    )
    # One agent holds one reservation (as the planner and the engine keep them).
    seen: set[str] = set()
    carried = {j: a for j, a in carried.items() if not (a in seen or seen.add(a))}  # type: ignore[func-returns-value]
    limits = {
        u: UserLimits(
            share=rng.choice([1.0, 2.0]), max_gpus=rng.choice([0, 0, 3]), max_running=rng.choice([0, 0, 2, 5])
        )
        for u in ("u0", "u1", "u2")
    }
    policy = Policy(
        now_ns=10**12,
        fairshare=fairshare,
        usage={"u0": rng.random() * 1e4, "u1": rng.random() * 1e4},
        limits=limits,
        reserve_after_s=float("inf"),
        reservations=carried,
    )
    full = plan(kept, _copy(agents), running, policy)

    arrival = {r.job_id: i for i, r in enumerate(queue)}
    per_user: dict[str, list[JobRequest]] = {}
    for r in sorted(queue, key=lambda r: (own_key(r), arrival[r.job_id])):
        per_user.setdefault(r.owner, []).append(r)
    held_gpus: dict[str, int] = {}
    held_jobs: dict[str, int] = {}
    for rj in running:
        held_gpus[rj.owner] = held_gpus.get(rj.owner, 0) + len(rj.gpu_indices)
        held_jobs[rj.owner] = held_jobs.get(rj.owner, 0) + 1
    heads = place_heads(
        lambda dropped: lazy_order(
            per_user, policy, lambda r: r.job_id not in blocked, dropped, lambda r: arrival[r.job_id]
        ),
        _copy(agents),
        held_gpus,
        held_jobs,
        policy,
        {shape_of(r) for r in queue},
        lambda gang: [r for r in kept if r.gang == gang],
    )
    assert heads.placements == full.placements
    assert heads.walked <= len(kept)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.booleans())
def test_lazy_order_is_the_order(seed: int, fairshare: bool) -> None:
    rng = random.Random(seed)
    queue = _queue(rng, rng.randrange(0, 60))
    policy = Policy(now_ns=0, fairshare=fairshare, usage={"u1": rng.random() * 1e4}, durations={})
    arrival = {r.job_id: i for i, r in enumerate(queue)}
    per_user: dict[str, list[JobRequest]] = {}
    for r in sorted(queue, key=lambda r: (own_key(r), arrival[r.job_id])):
        per_user.setdefault(r.owner, []).append(r)
    lazy = [r.job_id for r in lazy_order(per_user, policy, arrival=lambda r: arrival[r.job_id])]
    assert lazy == [r.job_id for r in order(queue, policy)]


def test_a_full_pool_walks_one_job_of_a_deep_queue() -> None:
    agents = [AgentState(f"a{i}", f"n{i}", 8.0, 16 * GIB, [], 1) for i in range(100)]
    for a in agents:
        a.hold(1.0, 0, [])
    queue = [JobRequest(f"j{i}", cpu=1.0, owner=f"u{i % 3}", submitted_at=i) for i in range(10_000)]
    per_user: dict[str, list[JobRequest]] = {}
    for r in queue:
        per_user.setdefault(r.owner, []).append(r)
    policy = Policy(now_ns=0)
    heads = place_heads(
        lambda dropped: lazy_order(per_user, policy, dropped=dropped),
        agents,
        {},
        {},
        policy,
        {shape_of(queue[0])},
        lambda gang: [],
    )
    assert heads.placements == []
    assert heads.walked == 1


def test_free_agents_take_the_heads_and_the_walk_stops() -> None:
    agents = [AgentState(f"a{i}", f"n{i}", 8.0, 16 * GIB, [], 1) for i in range(100)]
    for a in agents[10:]:
        a.hold(1.0, 0, [])
    queue = [JobRequest(f"j{i}", cpu=1.0, owner="u", submitted_at=i) for i in range(10_000)]
    policy = Policy(now_ns=0)
    heads = place_heads(
        lambda dropped: lazy_order({"u": queue}, policy, dropped=dropped),
        agents,
        {},
        {},
        policy,
        {shape_of(queue[0])},
        lambda gang: [],
    )
    assert [j for j, _, _ in heads.placements] == [f"j{i}" for i in range(10)]
    assert heads.walked == 11
