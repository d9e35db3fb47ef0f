"""What a scheduling pass starts from (engine._state): a heads-only pass, which skips the running jobs'
records and reads only their usage so far, sees the same fair-share usage as a full pass, and as the
fair-share arithmetic (fairshare.interval_usage) gives job by job."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.engine import Engine
from dstack.coordinator.fairshare import interval_usage, weight
from dstack.coordinator.model import JobUpdate, TerminationReason
from dstack.coordinator.store import NewJob, Store
from dstack.protos.v1 import common_pb2

NS = 1_000_000_000


class StillClock:
    """Time moves only when the test moves it."""

    def __init__(self) -> None:
        self.wall_ns = 1_700_000_000 * NS
        self.mono = 5_000.0

    def time_ns(self) -> int:
        return self.wall_ns

    def monotonic(self) -> float:
        return self.mono

    async def sleep(self, seconds: float) -> None:
        raise AssertionError("not used")

    def advance(self, seconds: float) -> None:
        self.wall_ns += int(seconds * NS)
        self.mono += seconds


def test_a_heads_pass_sees_the_usage_so_far_a_full_pass_does(tmp_path: Path) -> None:
    clock = StillClock()
    config = CoordinatorConfig(
        state_dir=tmp_path, listen="127.0.0.1:0", storage_url="", admin_token="a", join_token="j"
    )
    config = replace(config, fairshare_half_life_s=600)
    store = Store(tmp_path / "coordinator.db")
    engine = Engine(config, store, db=None, clock=clock)  # type: ignore[arg-type]  # passes called on this thread
    inv = common_pb2.Inventory(hostname="h", cpu_count=16, memory_total_bytes=64 << 30, max_jobs=1)
    agents = set()
    for i in range(12):
        agent_id = store.register_agent(f"a-{i}", f"tok-{i}", b"")
        store.agent_online(agent_id, inv.SerializeToString(), 2**62)
        agents.add(agent_id)
    engine.hub.connected_ids = lambda: set(agents)  # type: ignore[method-assign]
    spec = common_pb2.JobSpec(job_name="main", workflow="t", provider="bash", commands=["true"])
    for cpu in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14):
        spec.resources.cpu = cpu
        store.create_run("admin", "t", b"", "", [], [NewJob("main", spec.SerializeToString(), 0, 0, 0, [])])
    for row in store.waiting_jobs():
        engine.queue.add_row(row)
    plan = engine._timed_heads(engine.queue.by_user(), engine.queue.shapes(), agents, True)
    engine.queue.discard(plan.done)
    assert len(plan.assignments) == 12
    started = []
    for k, a in enumerate(plan.assignments[:9]):  # nine start, at different times; three are still starting
        clock.advance(7 * k)
        engine.started.mark(a.job_id, clock.time_ns())
        running = JobUpdate(a.job_id, common_pb2.JOB_STATUS_RUNNING, time_ns=clock.time_ns())
        store.apply_job_updates(a.agent_id, [running])
        started.append((a.job_id, clock.time_ns()))
    clock.advance(100)

    _, heads_agents, heads_running, heads_usage = engine._state(agents, charge=False, full=False)
    _, full_agents, full_running, full_usage = engine._state(agents, charge=False, full=True)

    assert heads_running == [] and len(full_running) == 12
    assert heads_usage == full_usage  # the same arithmetic, bit for bit
    cpu_of = {j.job_id: j.cpu for j in full_running}
    expected = sum(
        interval_usage(weight(0, cpu_of[job_id]), stamp, clock.time_ns(), clock.time_ns(), 600)
        for job_id, stamp in started
    )
    assert abs(heads_usage["admin"] - expected) <= 1e-9 * expected and expected > 0
    assert heads_agents == full_agents  # and the same agents, with what their jobs hold
    assert sum(a.jobs for a in heads_agents.values()) == 12


def test_the_agent_states_kept_between_heads_passes_equal_fresh_ones_after_any_events(tmp_path: Path) -> None:
    """Heads-only passes keep the agents' states from pass to pass and build again only the agents whose
    holdings changed or that they placed on: after jobs start and end, placements the database refuses
    (the job was stopped meanwhile: the planner held room for it on the kept state), and agents that
    leave and come back, each pass starts from exactly what fresh states would say, in the same order."""
    rng = random.Random(7)
    clock = StillClock()
    config = CoordinatorConfig(
        state_dir=tmp_path, listen="127.0.0.1:0", storage_url="", admin_token="a", join_token="j"
    )
    store = Store(tmp_path / "coordinator.db")
    engine = Engine(config, store, db=None, clock=clock)  # type: ignore[arg-type]  # passes called on this thread
    agents: list[str] = []
    for i in range(16):
        inv = common_pb2.Inventory(
            hostname=f"h{i}", cpu_count=8, memory_total_bytes=32 << 30, max_jobs=rng.choice([1, 2, 3])
        )
        inv.gpus.extend(common_pb2.GpuInfo(index=g, name="A100", memory_total_bytes=40 << 30) for g in range(i % 3))
        agent_id = store.register_agent(f"a-{i}", f"tok-{i}", b"")
        store.agent_online(agent_id, inv.SerializeToString(), 2**62)
        agents.append(agent_id)
    connected = set(agents)
    engine.hub.connected_ids = lambda: set(connected)  # type: ignore[method-assign]
    spec = common_pb2.JobSpec(job_name="main", workflow="t", provider="bash", commands=["true"])
    for _ in range(300):
        spec.resources.cpu = rng.choice([0, 1, 2, 4])
        spec.resources.gpu.count = rng.choice([0, 0, 1])
        store.create_run("admin", "t", b"", "", [], [NewJob("main", spec.SerializeToString(), 0, 0, 0, [])])
    for row in store.waiting_jobs():
        engine.queue.add_row(row)
    assigned: dict[str, str] = {}  # job -> agent, not started
    running: dict[str, str] = {}
    refused = placed = 0
    for _ in range(40):
        clock.advance(rng.random() * 10)
        for job_id in rng.sample(sorted(assigned), k=len(assigned) // 2):
            engine.started.mark(job_id, clock.time_ns())
            store.apply_job_updates(
                assigned[job_id], [JobUpdate(job_id, common_pb2.JOB_STATUS_RUNNING, time_ns=clock.time_ns())]
            )
            running[job_id] = assigned.pop(job_id)
        for job_id in rng.sample(sorted(running), k=len(running) // 3):
            done = JobUpdate(job_id, common_pb2.JOB_STATUS_DONE, TerminationReason.DONE, time_ns=clock.time_ns())
            store.apply_job_updates(running.pop(job_id), [done])
        if rng.random() < 0.3:  # stopped in the database, still in the engine's queue: its placement is refused
            for w in engine.queue.snapshot()[:3]:
                store.request_stop(store.runs.by_id(w.run_id).name)
        if rng.random() < 0.15:
            connected.symmetric_difference_update({rng.choice(agents)})  # one leaves, or comes back

        _, kept, _, _ = engine._state(set(connected), charge=False, full=False)
        _, fresh, _, _ = engine._state(set(connected), charge=False, full=True)
        assert list(kept) == list(fresh) and kept == fresh

        plan = engine._timed_heads(engine.queue.by_user(), engine.queue.shapes(), set(connected), True)
        engine.queue.discard(plan.done)
        assigned.update((a.job_id, a.agent_id) for a in plan.assignments)
        placed += len(plan.assignments)
        refused += len(plan.done) - len(plan.assignments)
    assert placed > 50 and refused > 0  # the sequence did place, and did have placements refused
