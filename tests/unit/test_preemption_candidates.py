"""The lease loop's preemption check at a deep queue (issue 16): its decisions equal the old check's
(tests/unit/old_preemption.py, the oracle) over random pools, queues, waits, reservations and usage, and
what it costs no longer grows with the queue's depth or with agents x running jobs."""

from __future__ import annotations

import copy
import random
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.engine import Engine
from dstack.coordinator.model import JobUpdate
from dstack.coordinator.store import NewJob, Store
from dstack.protos.v1 import common_pb2
from tests.inproc.clock import ManualClock
from tests.unit import old_preemption

JS = common_pb2.JobStatus
USERS = ("alice", "bob", "carol")


def _engine(tmp: Path, clock: ManualClock, **cfg: Any) -> Engine:
    config = CoordinatorConfig(state_dir=tmp, listen="127.0.0.1:0", storage_url="", admin_token="a", join_token="j")
    store = Store(tmp / "coordinator.db", clock.time_ns)  # rows stamped on the test's clock
    return Engine(replace(config, **cfg), store, db=None, clock=clock)  # type: ignore[arg-type]  # not used here


def _agent(engine: Engine, name: str, gpus: int, max_jobs: int, gpu_name: str = "H100") -> str:
    inv = common_pb2.Inventory(hostname=name, cpu_count=8, memory_total_bytes=64 << 30, max_jobs=max_jobs)
    for i in range(gpus):
        inv.gpus.add(index=i, name=gpu_name, memory_total_bytes=80 << 30)
    agent_id = engine.store.register_agent(name, f"tok-{name}", b"")
    engine.store.agent_online(agent_id, inv.SerializeToString(), 2**62)
    return agent_id


def _spec(rng: random.Random, name: str, interruptible: bool, after: str = "") -> common_pb2.JobSpec:
    spec = common_pb2.JobSpec(job_name=name, workflow="t", provider="bash", commands=["true"])
    spec.resources.cpu = rng.choice([0, 1, 2])
    spec.resources.gpu.count = rng.choice([0, 1, 1, 2])
    spec.resources.gpu.name = rng.choice(["", "", "H100"])
    spec.resources.interruptible = interruptible
    if after:
        spec.depends_on.append(after)
    if rng.random() < 0.05:
        spec.gang, spec.nnodes = "g", 1
    return spec


def _submit(engine: Engine, owner: str, specs: list[common_pb2.JobSpec], priority: int = 0) -> list[str]:
    jobs = [
        NewJob(s.job_name, s.SerializeToString(), s.resources.cpu, 0, s.resources.gpu.count, list(s.depends_on))
        for s in specs
    ]
    return list(engine.store.create_run(owner, "t", b"", "", [], jobs, priority=priority).job_ids)


def _queue_all(engine: Engine) -> None:
    for row in engine.store.waiting_jobs():
        if row.id not in engine.queue:
            engine.queue.add_row(row)
            engine.waits.start(row.id)


def _place(engine: Engine, connected: set[str], started_ns: int) -> list[str]:
    engine.hub.connected_ids = lambda: set(connected)  # type: ignore[method-assign]
    plan = engine._timed_heads(engine.queue.by_user(), engine.queue.shapes(), connected, True)
    engine.queue.discard(plan.done)
    engine.waits.discard(plan.done)
    for a in plan.assignments:
        engine.store.apply_job_updates(a.agent_id, [JobUpdate(a.job_id, JS.JOB_STATUS_RUNNING, time_ns=started_ns)])
    return [a.job_id for a in plan.assignments]


def _random_case(tmp: Path, seed: int) -> tuple[Engine, set[str], list[str]]:
    rng = random.Random(seed)
    clock = ManualClock(start_ns=1_700_000_000 * 10**9)
    engine = _engine(
        tmp,
        clock,
        reserve_after_s=rng.choice([30.0, 120.0, float("inf")]),
        preempt_after_s=rng.choice([10.0, 60.0, float("inf")]),
        fairshare=rng.random() < 0.8,
        preempt_min_run_s=rng.choice([0.0, 30.0]),
        preempt_margin=rng.choice([1.0, 2.0]),
    )
    connected = {
        _agent(engine, f"a{i}", rng.choice([0, 1, 2, 4]), rng.choice([1, 2, 4])) for i in range(rng.randint(1, 5))
    }
    # What runs: a first wave, placed by the planner, some of it interruptible.
    for _ in range(rng.randint(2, 12)):
        _submit(engine, rng.choice(USERS), [_spec(rng, "main", rng.random() < 0.6)])
    _queue_all(engine)
    running = _place(engine, connected, clock.time_ns() - int(rng.uniform(0, 100) * 1e9))
    if running and rng.random() < 0.3:
        engine.store.request_preempt([rng.choice(running)], "earlier")
    # What waits: runs submitted over time (some with a job that depends on another, some of one
    # submission instant), some started waiting again later (requeued, out of submission order).
    for _ in range(rng.randint(1, 60)):
        clock.step(rng.choice([0.0, 0.5, 3.0, 20.0]))
        owner = rng.choice(USERS)
        specs = [_spec(rng, "main", rng.random() < 0.2)]
        if rng.random() < 0.2:
            specs.append(_spec(rng, "after", False, after="main"))
        if rng.random() < 0.2:  # a twin: the same shape, the same submission instant
            twin = common_pb2.JobSpec()
            twin.CopyFrom(specs[0])
            twin.job_name = "twin"
            specs.append(twin)
        _submit(engine, owner, specs, priority=rng.choice([0, 0, 1]))
        _queue_all(engine)
    waiting = list(engine.queue.snapshot())
    for w in rng.sample(waiting, k=len(waiting) // 5):
        clock.step(rng.choice([0.0, 1.0, 40.0]))
        engine.waits.start(w.job_id)
    clock.step(rng.choice([5.0, 40.0, 200.0]))
    ids = [w.job_id for w in waiting]
    for job_id in rng.sample(ids, k=min(len(ids), rng.randint(0, 8))):
        engine.reservations[job_id] = rng.choice(sorted(connected))
    for job_id in rng.sample(ids, k=min(len(ids), rng.randint(0, 1))):
        engine.preempted_for[job_id] = rng.choice(sorted(connected))
    engine.last_usage = {u: rng.choice([0.0, 10.0, 100.0, 1000.0]) for u in USERS if rng.random() < 0.8}
    cfg = engine.config
    after = min(cfg.reserve_after_s, cfg.preempt_after_s if cfg.fairshare else float("inf"))
    return engine, connected, engine.waits.longer_than(after, engine.queue)


def test_the_check_decides_as_the_old_one_over_random_pools_queues_waits_and_reservations(tmp_path: Path) -> None:
    decided = 0
    for seed in range(150):
        engine, connected, starved = _random_case(tmp_path / str(seed), seed)
        held = dict(engine.preempted_for)
        want = old_preemption.victims(engine, connected, starved)
        want_held = engine.preempted_for
        engine.preempted_for = held
        got = engine._victims(connected, starved)
        assert got == want, f"seed {seed}"
        assert engine.preempted_for == want_held, f"seed {seed}"
        decided += want is not None
        engine.store.conn.close()
    assert decided >= 15  # the cases preempt often enough for the equality to mean something


def _deep_case(tmp: Path, queued: int, agents: int = 1) -> tuple[Engine, set[str], list[str]]:
    """`agents` agents of one GPU each running a job, one of them interruptible (too young to preempt),
    `queued` jobs of another user and the same shape waiting long: the check finds nothing to do, every
    second."""
    clock = ManualClock()
    engine = _engine(tmp, clock, preempt_after_s=1.0, reserve_after_s=1.0)
    connected = {_agent(engine, f"a{i}", 1, 1) for i in range(agents)}
    spec = common_pb2.JobSpec(job_name="main", workflow="t", provider="bash", commands=["true"])
    spec.resources.gpu.count = 1
    for i in range(agents):
        spec.resources.interruptible = i == 0
        _submit(engine, "alice", [spec])
    _queue_all(engine)
    assert len(_place(engine, connected, clock.time_ns())) == agents
    spec.resources.interruptible = False
    for _ in range(queued):
        clock.step(0.001)  # each its own submission instant, as real ones are
        _submit(engine, "bob", [spec])
    _queue_all(engine)
    clock.step(10.0)
    return engine, connected, engine.waits.longer_than(1.0, engine.queue)


def test_the_check_reads_the_rows_of_only_the_first_long_waiting_job_of_each_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, connected, starved = _deep_case(tmp_path, 300)
    assert len(starved) == 300
    asked: list[int] = []
    starved_among = engine.store.starved_among

    def counted(job_ids: list[str]) -> Any:
        asked.append(len(job_ids))
        return starved_among(job_ids)

    monkeypatch.setattr(engine.store, "starved_among", counted)
    parsed: list[bytes] = []
    real = common_pb2.JobSpec.FromString

    def parse(data: bytes) -> common_pb2.JobSpec:
        parsed.append(data)
        return real(data)

    monkeypatch.setattr(common_pb2.JobSpec, "FromString", parse)
    assert engine._victims(connected, starved) is None
    assert asked == [1]  # was 300: every long-waiting job's row, every second
    assert len(parsed) <= 3  # the waiting job's spec, twice (read, then request), and the running one's


def test_a_check_copies_no_agent_and_looks_at_each_running_job_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 50 agents each running a job, one of them interruptible: whether a waiting job fits once jobs go
    # used to copy every agent and walk every running job for each agent.
    copies: list[object] = []
    real = copy.deepcopy

    def counted(x: Any, memo: Any = None) -> Any:
        copies.append(x)
        return real(x, memo)

    engine, connected, starved = _deep_case(tmp_path, 5, agents=50)
    monkeypatch.setattr(copy, "deepcopy", counted)
    assert engine._victims(connected, starved) is None
    assert len(copies) <= 4  # was 50 for each cause tried: every agent


def test_whether_a_job_may_be_preempted_reads_each_running_job_s_spec_once(tmp_path: Path) -> None:
    engine, _, _ = _deep_case(tmp_path, 3)
    statements: list[str] = []
    conn: sqlite3.Connection = engine.store.conn
    assert engine.store.any_preemptible_running()
    conn.set_trace_callback(statements.append)
    try:
        assert engine.store.any_preemptible_running()
    finally:
        conn.set_trace_callback(None)
    assert statements and not any("spec" in s for s in statements)  # was: every running job's spec, every call


def test_a_job_held_for_an_agent_does_not_hide_a_younger_one_that_any_agent_would_serve(tmp_path: Path) -> None:
    # bob's older job is reserved on the agent whose job may not be preempted; his younger one, of the same
    # shape, is not reserved: it gets the interruptible job's agent (the two are separate classes).
    clock = ManualClock()
    engine = _engine(tmp_path, clock, reserve_after_s=1.0, fairshare=False, preempt_min_run_s=0.0)
    connected = {_agent(engine, "a0", 1, 1), _agent(engine, "a1", 1, 1)}
    spec = common_pb2.JobSpec(job_name="main", workflow="t", provider="bash", commands=["true"])
    spec.resources.gpu.count = 1
    for interruptible in (True, False):
        spec.resources.interruptible = interruptible
        _submit(engine, "alice", [spec])
    _queue_all(engine)
    assert len(_place(engine, connected, clock.time_ns())) == 2
    spec.resources.interruptible = False
    older = _submit(engine, "bob", [spec])[0]
    clock.step(0.001)
    younger = _submit(engine, "bob", [spec])[0]
    _queue_all(engine)
    clock.step(10.0)
    on_a1 = next(j.agent_id for j in engine.store.running_for_preemption() if not j.interruptible)
    engine.reservations = {older: on_a1}
    starved = engine.waits.longer_than(1.0, engine.queue)
    want = old_preemption.victims(engine, connected, starved)
    assert want is not None and want[0].for_job == younger
    engine.preempted_for = {}
    assert engine._victims(connected, starved) == want
