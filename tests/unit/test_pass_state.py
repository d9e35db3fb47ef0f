"""What a scheduling pass starts from (engine._state): a heads-only pass, which skips the running jobs'
records and reads only their usage so far, sees the same fair-share usage as a full pass, and as the
fair-share arithmetic (fairshare.interval_usage) gives job by job."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.engine import Engine
from dstack.coordinator.fairshare import interval_usage, weight
from dstack.coordinator.model import JobUpdate
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
        engine.started.mark((a.job_id, clock.time_ns()))
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
