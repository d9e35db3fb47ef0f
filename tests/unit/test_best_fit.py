"""The planner's best-fit index (planner._BestFit, a heap per job shape) places exactly as the plain scan
(every agent looked at: `_place` below) does, job after job, over random pools and queues: same agent,
same GPUs, same refusals, ties broken alike, a new attempt's last agent avoided alike."""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence

from dstack.coordinator.planner import Plan, _BestFit, shape_of
from dstack.coordinator.scheduler import AgentState, Gpu, JobRequest, _fits, _leftover


def _place(req: JobRequest, pool: Sequence[AgentState], p: Plan) -> bool:
    """Best fit by looking at every agent of `pool` (the planner's placement before its index): what
    `_BestFit` must agree with."""
    candidates = [(a, gpus) for a in pool if (gpus := _fits(a, req)) is not None]
    if not candidates:
        return False
    # Best fit; a new attempt's last agent (where it was lost) only if nothing else fits.
    agent, gpus = min(candidates, key=lambda c: (c[0].agent_id == req.avoid_agent, _leftover(c[0], req)))
    agent.hold(req.cpu, req.memory, gpus)
    p.placements.append((req.job_id, agent.agent_id, gpus))
    return True


def world(rng: random.Random) -> tuple[list[AgentState], list[JobRequest]]:
    agents = []
    for i in range(rng.randint(2, 25)):
        gpus = [Gpu(g, rng.choice(["A100", "H100"]), rng.choice([40, 80]) << 30) for g in range(rng.choice([0, 2, 8]))]
        a = AgentState(
            f"a{i:02d}", f"h{i}", float(rng.choice([4, 8])), rng.choice([8, 16]) << 30, gpus, rng.choice([1, 3, 100])
        )
        a.containers = rng.random() < 0.5
        agents.append(a)
    jobs = [
        JobRequest(
            f"j{j:03d}",
            cpu=float(rng.choice([0, 1, 2])),
            memory=rng.choice([0, 2 << 30]),
            gpu_count=rng.choice([0, 0, 1, 2]),
            gpu_name=rng.choice(["", "H100"]),
            needs_container=rng.random() < 0.2,
            avoid_agent=rng.choice(["", f"a{rng.randint(0, 3):02d}"]),
        )
        for j in range(rng.randint(1, 80))
    ]
    return agents, jobs


def test_the_best_fit_index_places_as_the_plain_scan_does() -> None:
    rng = random.Random(16)
    placements = 0
    for _ in range(300):
        agents, jobs = world(rng)
        # The last agent stands for one reserved for some of the jobs: outside the pool, after it in order.
        scanned, indexed = copy.deepcopy(agents), copy.deepcopy(agents)
        own_scanned, own_indexed = scanned.pop(), indexed.pop()
        p1, p2 = Plan(), Plan()
        index = _BestFit(indexed)
        for job in jobs:
            reserved = rng.random() < 0.2
            pool = [*scanned, own_scanned] if reserved else scanned
            # As plan() does: the index hears of every placement before it places the next job.
            assert _place(job, pool, p1) == index.place(job, shape_of(job), p2, own_indexed if reserved else None)
            if p2.placements:
                index.held(p2.placements[-1][1])
        assert p1.placements == p2.placements
        placements += len(p1.placements)
    assert placements > 1000  # the worlds are not all refusals
