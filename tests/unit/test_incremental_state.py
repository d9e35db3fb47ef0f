"""The state a scheduling pass keeps between passes equals a rebuild from scratch after any sequence
of events: the waiting queue's per-user order, shapes and gangs (coordinator/queue.py), and what
running jobs hold per agent and per user (coordinator/holdings.py)."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from dstack.coordinator.holdings import Held, Holdings
from dstack.coordinator.model import JobSpec, Resources
from dstack.coordinator.planner import own_key, shape_of
from dstack.coordinator.queue import Waiting, WaitingQueue


def _spec(rng: random.Random, name: str) -> JobSpec:
    gang = rng.random() < 0.1
    return JobSpec(
        encoded=b"",
        job_name=name,
        workflow="w",
        resources=Resources(cpu=float(rng.choice([0, 1, 2])), gpu_count=rng.choice([0, 1, 2])),
        gang="g" if gang else "",
        nnodes=2 if gang else 1,
        cache=rng.random() < 0.2,
    )


def _kept(q: WaitingQueue) -> int:
    """Entries in the users' lists, waiting or gone (what the queue holds in memory beside `_jobs`)."""
    return sum(len(ws) for ws in q._by_user.values())


def _check(q: WaitingQueue, rng: random.Random) -> None:
    live = q.snapshot()
    # Bounded whether or not a heads pass ever tidies (a shallow queue only gets full passes).
    assert _kept(q) <= 2 * len(live) + 1
    by_user = q.by_user() if rng.random() < 0.7 else None  # tidied at some points only, as passes do
    if by_user is None:
        return
    expected: dict[str, list[str]] = {}
    for w in sorted(live, key=lambda w: (own_key(w.request), w.seq)):
        expected.setdefault(w.request.owner, []).append(w.job_id)
    got = {u: [w.job_id for w in ws if q.live(w)] for u, ws in by_user.items()}
    assert {u: ids for u, ids in got.items() if ids} == expected
    assert q.shapes() == {shape_of(w.request) for w in live}
    gangs: dict[str, set[str]] = {}
    for w in live:
        if w.request.gang:
            gangs.setdefault(w.request.gang, set()).add(w.job_id)
    for key, members in gangs.items():
        assert {w.job_id for w in q.gang(key)} == members
    # Tidying keeps the lists short: at most as many entries gone as waiting, plus the one pass's worth.
    assert sum(len(ws) for ws in by_user.values()) <= 2 * len(live) + 1


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32))
def test_queue_equals_a_rebuild_after_random_events(seed: int) -> None:
    rng = random.Random(seed)
    q = WaitingQueue()
    runs: dict[str, list[str]] = {}
    taken: dict[str, Waiting] = {}  # out for the step cache, may come back
    n = 0
    for _ in range(rng.randrange(1, 120)):
        ids = [w.job_id for w in q.snapshot()]
        op = rng.random()
        if op < 0.35 or not ids:
            run = f"r{len(runs)}"
            jobs = []
            for _ in range(rng.randrange(1, 4)):
                n += 1
                jobs.append((f"j{n}", _spec(rng, f"j{n}")))
            runs[run] = [j for j, _ in jobs]
            q.add_run(
                run,
                jobs,
                owner=rng.choice(["u0", "u1", "u2"]),
                priority=rng.choice([0, 0, 5]),
                submitted_at=rng.randrange(0, 50),
            )
        elif op < 0.6:
            q.discard(rng.sample(ids, rng.randrange(1, min(len(ids), 5) + 1)))
        elif op < 0.7:
            j = rng.choice(ids)
            w = q.get(j)
            assert w is not None
            taken[j] = w
            q.discard([j])
        elif op < 0.8 and taken:
            j = rng.choice(sorted(taken))
            q.add_waiting(taken.pop(j))
        elif op < 0.9:
            q.discard_run(rng.choice(sorted(runs)))
        else:
            q.mark_pending(rng.sample(ids, 1))
        _check(q, rng)


def test_jobs_that_pass_through_a_shallow_queue_do_not_stay_in_its_lists() -> None:
    """The soak's leak: with fewer than FULL_QUEUE waiting, every pass is a full one, which never calls
    `by_user`; each job that ever waited stayed in its user's list (~5.5 MiB an hour at 2 runs/s)."""
    q = WaitingQueue()
    spec = JobSpec(encoded=b"", job_name="j", workflow="w", resources=Resources(cpu=1.0))
    for i in range(10_000):
        q.add_run(f"r{i}", [(f"j{i}", spec)], owner=f"u{i % 3}")
        if i >= 5:  # a few wait at any time, as at steady load
            q.discard([f"j{i - 5}"])
    assert len(q) == 5
    assert _kept(q) <= 2 * len(q) + 3  # one entry gone per user at most beyond twice the waiting
    q.discard([w.job_id for w in q.snapshot()])
    assert _kept(q) == 0 and not q._gone


def _rebuilt(jobs: list[Held]) -> Holdings:
    h = Holdings()
    h.reset(jobs)
    return h


def _same(a: Holdings, b: Holdings) -> None:
    assert a.jobs == b.jobs
    assert a.user_gpus == b.user_gpus and a.user_jobs == b.user_jobs
    assert a.agents.keys() == b.agents.keys()
    for k in a.agents:
        x, y = a.agents[k], b.agents[k]
        assert (x.gpus, x.jobs, x.memory) == (y.gpus, y.jobs, y.memory)
        assert abs(x.cpu - y.cpu) < 1e-6


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32))
def test_holdings_equal_a_rebuild_after_random_events(seed: int) -> None:
    rng = random.Random(seed)
    h = Holdings()
    n = 0
    free: dict[str, set[int]] = {f"a{i}": set(range(4)) for i in range(5)}
    for _ in range(rng.randrange(1, 150)):
        op = rng.random()
        if op < 0.5:
            agent = rng.choice(sorted(free))
            gpus = tuple(sorted(rng.sample(sorted(free[agent]), min(len(free[agent]), rng.randrange(0, 3)))))
            free[agent] -= set(gpus)
            n += 1
            h.add(
                Held(
                    f"j{n}",
                    agent,
                    rng.choice(["u0", "u1"]),
                    rng.choice([0.0, 0.5, 1.0, 0.1]),
                    rng.randrange(0, 100),
                    gpus,
                    None,
                    "k",
                )
            )
        elif op < 0.85 and h.jobs:
            j = rng.choice(sorted(h.jobs))
            gone = h.jobs[j]
            free[gone.agent_id] |= set(gone.gpu_indices)
            h.remove(j)
        else:  # read again from the database (here: what is kept), as after a job may have ended
            h.reset(list(h.jobs.values()))
        _same(h, _rebuilt(list(h.jobs.values())))
    assert Counter(j.owner for j in h.jobs.values()) == Counter(h.user_jobs)
