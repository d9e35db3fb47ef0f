"""Estimated starts worked out at first read (planner.plan(lazy_etas=True), WaitInfos.estimate_later):
what a pass places, reserves, fails and says is the same as with estimates worked out in the pass, and the
estimates read later are the ones the pass would have given, though what they came from changed since."""

from __future__ import annotations

import copy
import random
import threading
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from dstack.coordinator import planner
from dstack.coordinator.planner import Policy, RunningJob, UserLimits, WaitInfo, WaitInfos, plan
from dstack.coordinator.scheduler import AgentState, Gpu, JobRequest

NS = 1_000_000_000
USERS = ("alice", "bob", "carol")


def world(seed: int) -> tuple[list[JobRequest], list[AgentState], list[RunningJob], Policy]:
    """A random pool, some of it busy with jobs that end at known or unknown times, and a queue of
    GPU and CPU jobs from three users, some with limits, a gang, reservations past their threshold."""
    rnd = random.Random(seed)
    agents: list[AgentState] = []
    running: list[RunningJob] = []
    for i in range(rnd.randint(1, 12)):
        gpus = rnd.choice((0, 2, 8))
        a = AgentState(f"ag{i}", f"host-{i}", 32.0, 128 << 30, [Gpu(g, "H100", 80 << 30) for g in range(gpus)], 8)
        for k in range(rnd.randint(0, 4)):
            free = [g for g in range(gpus) if g not in a.busy_gpus]
            held = tuple(rnd.sample(free, min(len(free), rnd.randint(0, 2))))
            cpu = float(rnd.randint(1, 8))
            if a.used_cpu + cpu > a.cpu_total:
                break
            a.hold(cpu, 1 << 30, held)
            end = None if rnd.random() < 0.2 else rnd.randint(1, 900) * NS
            running.append(RunningJob(f"r{i}-{k}", a.agent_id, rnd.choice(USERS), cpu, 1 << 30, held, 0, end))
        agents.append(a)
    queue: list[JobRequest] = []
    for j in range(rnd.randint(1, 60)):
        queue.append(
            JobRequest(
                job_id=f"j{j}",
                cpu=float(rnd.choice((1, 4, 16, 64))),
                memory=1 << 30,
                gpu_count=rnd.choice((0, 0, 1, 2, 8, 16)),
                owner=rnd.choice(USERS),
                priority=rnd.choice((0, 0, 1)),
                submitted_at=rnd.randint(0, 600) * NS,
                duration_key=rnd.choice(("w/a", "w/b", "w/c")),
                max_duration_s=rnd.choice((None, None, 120.0)),
            )
        )
    if rnd.random() < 0.3:
        queue += [
            JobRequest(job_id=f"g{r}", cpu=2.0, owner="bob", submitted_at=5 * NS, gang="run-x", nnodes=2, node_rank=r)
            for r in range(2)
        ]
    limits = {"carol": UserLimits(share=2.0, max_gpus=rnd.choice((0, 4)), max_running=rnd.choice((0, 3)))}
    policy = Policy(
        now_ns=700 * NS,
        fairshare=rnd.random() < 0.7,
        usage={u: rnd.uniform(0, 5000) for u in USERS},
        limits=limits,
        reserve_after_s=rnd.choice((60.0, float("inf"))),
        durations={"w/a": 30.0, "w/b": 300.0},
        waited_s=lambda job_id: float(hash(job_id) % 200),
    )
    return queue, agents, running, policy


def infos(w: WaitInfos) -> dict[str, WaitInfo]:
    return {job_id: w[job_id] for job_id in w}


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_a_pass_with_estimates_for_later_places_and_says_what_one_that_works_them_out_at_once_does(seed: int) -> None:
    queue, agents, running, policy = world(seed)
    durations = dict(policy.durations)
    policy = replace(policy, durations=durations)  # the caller's own dict, as the engine's medians are
    eager = plan(queue, copy.deepcopy(agents), running, policy)
    lazy = plan(queue, copy.deepcopy(agents), running, policy, lazy_etas=True)
    assert lazy.placements == eager.placements
    assert lazy.reservations == eager.reservations
    assert lazy.waiting == eager.waiting
    assert lazy.impossible == eager.impossible
    # What the estimates came from changes after the pass: a new median (the caller's dict) must not
    # change an estimate the pass would have given.
    durations["w/a"] = 9999.0
    durations["w/c"] = 1.0
    assert infos(lazy.info) == infos(eager.info)


def test_estimates_nobody_reads_are_never_worked_out_and_those_read_are_worked_out_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls = []
    real = planner._etas

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(planner, "_etas", counted)
    queue, agents, running, policy = world(7)
    p = plan(queue, agents, running, policy, lazy_etas=True)
    assert p.info and not calls  # positions and reasons are there; no estimate worked out yet
    assert len(p.info) == len(list(p.info)) and all(j in p.info for j in p.info)  # no estimate needed
    [p.info[j] for j in p.info]
    p.info.columns()
    assert calls == [1]


def test_estimates_to_come_never_overwrite_what_was_set_or_bring_back_what_was_removed() -> None:
    later = {"a": 5, "b": 6, "c": 7}
    w = WaitInfos()
    for job_id in later:
        w[job_id] = WaitInfo(1, "resources", "m", 0)
    w.estimate_later(lambda: later)
    merged = WaitInfos()
    merged["d"] = WaitInfo(9, "dependencies", "waiting for x", 0)
    merged.merge(w)
    merged.discard("b")  # no estimate worked out for it, and none comes back
    merged["c"] = WaitInfo(3, "resources", "set after", 42)  # set after the pass: it wins
    assert {j: merged[j].eta_ns for j in merged} == {"d": 0, "a": 5, "c": 42}
    assert "b" not in merged.columns()[3]


def test_two_threads_reading_at_once_both_see_the_estimates() -> None:
    """The event loop (a listing) and the DB thread may read at once: neither sees an estimate missing
    while the other is working them out."""
    started, release = threading.Event(), threading.Event()

    def slow() -> dict[str, int]:
        started.set()
        release.wait(5)
        return {"a": 11}

    w = WaitInfos()
    w["a"] = WaitInfo(1, "resources", "m", 0)
    w.estimate_later(slow)
    seen: list[int] = []
    first = threading.Thread(target=lambda: seen.append(w["a"].eta_ns))
    first.start()
    assert started.wait(5)
    second = threading.Thread(target=lambda: seen.append(w["a"].eta_ns))
    second.start()
    second.join(0.2)
    assert second.is_alive()  # waits for the first to finish, rather than reading 0
    release.set()
    first.join(5)
    second.join(5)
    assert seen == [11, 11]


def test_estimates_that_fail_read_unknown_and_every_reason_is_still_there() -> None:
    """A listing reads a job's info with Mapping.get, which takes a KeyError for "no info": an estimate
    that failed with one must not hide the job's position and reason."""

    def broken() -> dict[str, int]:
        raise KeyError("ag9")

    w = WaitInfos()
    w["a"] = WaitInfo(1, "resources", "waiting: 1 GPU free on no agent", 0)
    w.estimate_later(broken)
    assert w.get("a") == WaitInfo(1, "resources", "waiting: 1 GPU free on no agent", 0)
