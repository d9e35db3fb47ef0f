"""The engine's reread (engine._state, every REREAD_S): it applies what it reads as a difference
(Holdings.sync) and keeps the agents' rows and kept states when they read the same, instead of
rebuilding them all (a 220-300 ms pass every 10 s at 5,000 agents). It stays the safety net it was:
after each reread, what the engine holds and the states a heads-only pass starts from equal a fresh full
read, whatever happened meanwhile, including writes the journal (coordinator/store/journal.py) never saw."""

from __future__ import annotations

import json
import random
import sqlite3
import time
from pathlib import Path

import pytest

from dstack.coordinator import engine as engine_module
from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.engine import Engine, _held
from dstack.coordinator.holdings import Holdings
from dstack.coordinator.model import ON_AGENT, JobStatus, JobUpdate, TerminationReason
from dstack.coordinator.scheduler import AgentState
from dstack.coordinator.store import NewJob, Store
from dstack.protos.v1 import common_pb2
from tests.unit.test_pass_state import StillClock

ON_AGENT_SQL = ",".join(str(int(s)) for s in ON_AGENT)


def _engine(tmp_path: Path, agents_n: int, rng: random.Random) -> tuple[Engine, Store, list[str]]:
    config = CoordinatorConfig(
        state_dir=tmp_path, listen="127.0.0.1:0", storage_url="", admin_token="a", join_token="j"
    )
    store = Store(tmp_path / "coordinator.db")
    engine = Engine(config, store, db=None, clock=StillClock())  # type: ignore[arg-type]  # passes on this thread
    agents: list[str] = []
    for i in range(agents_n):
        agent_id = store.register_agent(f"a-{i}", f"tok-{i}", b"")
        store.agent_online(agent_id, _inventory(i, rng.choice([1, 2, 3])), 2**62)
        agents.append(agent_id)
    return engine, store, agents


def _inventory(i: int, max_jobs: int, cpu_count: int = 8) -> bytes:
    inv = common_pb2.Inventory(hostname=f"h{i}", cpu_count=cpu_count, memory_total_bytes=32 << 30, max_jobs=max_jobs)
    inv.gpus.extend(common_pb2.GpuInfo(index=g, name="A100", memory_total_bytes=40 << 30) for g in range(i % 3))
    return inv.SerializeToString()


def _submit(engine: Engine, store: Store, rng: random.Random, n: int) -> None:
    spec = common_pb2.JobSpec(job_name="main", workflow="t", provider="bash", commands=["true"])
    for _ in range(n):
        spec.resources.cpu = rng.choice([0, 0.1, 0.2, 1, 2])  # tenths: sums that leave a float residue
        spec.resources.gpu.count = rng.choice([0, 0, 1])
        store.create_run("admin", "t", b"", "", [], [NewJob("main", spec.SerializeToString(), 0, 0, 0, [])])
    for row in store.waiting_jobs():
        if row.id not in engine.queue:
            engine.queue.add_row(row)


def _fresh_holdings(store: Store) -> Holdings:
    h = Holdings()
    h.reset(_held(j) for j in store.jobs_on_agents())
    return h


def _fresh_states(tmp_path: Path, store: Store, connected: set[str], holdings: Holdings) -> dict[str, AgentState]:
    """The agents' states as an engine that kept nothing builds them: from the rows read now."""
    config = CoordinatorConfig(
        state_dir=tmp_path, listen="127.0.0.1:0", storage_url="", admin_token="a", join_token="j"
    )
    other = Engine(config, store, db=None, clock=StillClock())  # type: ignore[arg-type]
    states = other._idle_agent_states(connected)
    for agent_id, held in holdings.agents.items():
        if (a := states.get(agent_id)) is not None:
            engine_module._hold_all(a, held)
    return states


def _assert_same_holdings(kept: Holdings, fresh: Holdings) -> None:
    """Equal to a rebuild, CPU sums bit for bit (a residue would decide an exact fit)."""
    assert kept.jobs == fresh.jobs
    assert kept.user_gpus == fresh.user_gpus and kept.user_jobs == fresh.user_jobs
    assert {k: (a.cpu, a.memory, a.gpus, a.jobs) for k, a in kept.agents.items()} == {
        k: (a.cpu, a.memory, a.gpus, a.jobs) for k, a in fresh.agents.items()
    }


def _elsewhere(tmp_path: Path) -> sqlite3.Connection:
    """A second connection to the coordinator's database: the journal's triggers are the writer
    connection's own (TEMP), so what this one writes is what the journal cannot see."""
    c = sqlite3.connect(tmp_path / "coordinator.db", isolation_level=None)
    c.execute("PRAGMA busy_timeout = 10000")
    return c


def _unseen_write(c: sqlite3.Connection, rng: random.Random, agents: list[str]) -> str:
    """A write the journal does not see (from another connection). Returns what it did."""
    on = [r[0] for r in c.execute("SELECT id FROM jobs WHERE status = ? ORDER BY id", [int(JobStatus.RUNNING)])]
    kind = rng.choice(["ended", "cpu", "moved", "gpus", "inventory"])
    if kind == "inventory" or not on:
        i = rng.randrange(len(agents))
        c.execute(
            "UPDATE agents SET inventory = ? WHERE id = ?",
            [_inventory(i, rng.choice([1, 2, 3, 4]), rng.choice([4, 8, 16])), agents[i]],
        )
        return "inventory"
    job_id = rng.choice(on)
    if kind == "ended":
        c.execute("UPDATE jobs SET status = ? WHERE id = ?", [int(JobStatus.DONE), job_id])
    elif kind == "cpu":
        c.execute("UPDATE jobs SET cpu = ? WHERE id = ?", [rng.choice([0.1, 0.3, 3.0]), job_id])
    elif kind == "moved":
        c.execute("UPDATE jobs SET agent_id = ? WHERE id = ?", [rng.choice(agents), job_id])
    else:
        c.execute("UPDATE jobs SET gpu_indices = ? WHERE id = ?", [json.dumps(sorted(rng.sample(range(3), 2))), job_id])
    return kind


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_after_each_reread_the_engine_holds_what_a_fresh_full_read_says(tmp_path: Path, seed: int) -> None:
    """Random jobs placed, starting, ending; agents leaving and coming back; and writes the journal does
    not see (a job ended, moved, its CPU or GPUs changed, an agent's inventory changed). After every
    reread the holdings equal a rebuild from the database, and the agents' states a heads-only pass
    starts from equal the ones an engine that kept nothing builds from the rows, in the same order."""
    rng = random.Random(seed)
    engine, store, agents = _engine(tmp_path, 16, rng)
    connected = set(agents)
    engine.hub.connected_ids = lambda: set(connected)  # type: ignore[method-assign]
    elsewhere = _elsewhere(tmp_path)
    _submit(engine, store, rng, 400)
    clock = engine.clock
    assigned: dict[str, str] = {}
    running: dict[str, str] = {}
    unseen: list[str] = []
    rereads = differed = 0
    for step in range(60):
        clock.advance(rng.random() * 5)  # type: ignore[attr-defined]
        for job_id in rng.sample(sorted(assigned), k=len(assigned) // 2):
            engine.started.mark(job_id, clock.time_ns())
            update = JobUpdate(job_id, common_pb2.JOB_STATUS_RUNNING, time_ns=clock.time_ns())
            store.apply_job_updates(assigned[job_id], [update])
            running[job_id] = assigned.pop(job_id)
        for job_id in rng.sample(sorted(running), k=len(running) // 4):
            done = JobUpdate(job_id, common_pb2.JOB_STATUS_DONE, TerminationReason.DONE, time_ns=clock.time_ns())
            store.apply_job_updates(running.pop(job_id), [done])
        if rng.random() < 0.15:
            connected.symmetric_difference_update({rng.choice(agents)})  # one leaves, or comes back
        if rng.random() < 0.5:
            unseen.append(_unseen_write(elsewhere, rng, agents))
        reread = step % 3 == 2
        if reread:
            engine._reread_at = 0.0  # due now (REREAD_S is wall time; the test says when)
            before = {k: (a.cpu, a.memory, frozenset(a.gpus), a.jobs) for k, a in engine.holdings.agents.items()}
        _, kept, _, _ = engine._state(set(connected), charge=False, full=False)
        if reread:
            rereads += 1
            fresh_holdings = _fresh_holdings(store)
            differed += before != {
                k: (a.cpu, a.memory, frozenset(a.gpus), a.jobs) for k, a in fresh_holdings.agents.items()
            }
            _assert_same_holdings(engine.holdings, fresh_holdings)
            fresh = _fresh_states(tmp_path, store, set(connected), fresh_holdings)
            assert list(kept) == list(fresh) and kept == fresh
        plan = engine._timed_heads(engine.queue.by_user(), engine.queue.shapes(), set(connected), True)
        engine.queue.discard(plan.done)
        assigned.update((a.job_id, a.agent_id) for a in plan.assignments)
        # What the unseen writes ended or moved is no longer the sequence's to report.
        on = {
            r[0]: r[1] for r in store.db.conn.execute(f"SELECT id, agent_id FROM jobs WHERE status IN ({ON_AGENT_SQL})")
        }
        assigned = {j: a for j, a in assigned.items() if on.get(j) == a}
        running = {j: a for j, a in running.items() if on.get(j) == a}
        if len(engine.queue) < 50:
            _submit(engine, store, rng, 100)
    assert rereads == 20 and len(unseen) > 15
    assert differed > 3  # the rereads did find writes the journal had not seen, and corrected them


def test_a_write_the_journal_misses_is_corrected_within_reread_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job ended by a write the journal never sees holds its agent until the reread: the first pass
    that starts REREAD_S (wall time) after the last reread places on that agent again."""
    monkeypatch.setattr(engine_module, "REREAD_S", 0.5)
    rng = random.Random(5)
    engine, store, agents = _engine(tmp_path, 1, rng)
    connected = set(agents)
    engine.hub.connected_ids = lambda: set(connected)  # type: ignore[method-assign]
    store.db.conn.execute("UPDATE agents SET inventory = ?", [_inventory(0, 1)])  # one job at a time
    spec = common_pb2.JobSpec(job_name="main", workflow="t", provider="bash", commands=["true"]).SerializeToString()
    for _ in range(3):
        store.create_run("admin", "t", b"", "", [], [NewJob("main", spec, 0, 0, 0, [])])
    for row in store.waiting_jobs():
        engine.queue.add_row(row)

    def heads() -> list[str]:
        plan = engine._timed_heads(engine.queue.by_user(), engine.queue.shapes(), set(connected), True)
        engine.queue.discard(plan.done)
        return [a.job_id for a in plan.assignments]

    reread_s = engine_module.REREAD_S
    before_first = time.perf_counter()
    first = heads()  # the first pass reads everything
    read_at = time.perf_counter()
    assert len(first) == 1
    _elsewhere(tmp_path).execute("UPDATE jobs SET status = ? WHERE id = ?", [int(JobStatus.DONE), first[0]])
    written_at = time.perf_counter()
    placed: list[str] = []
    while not placed:
        began = time.perf_counter()
        placed = heads()
        ended = time.perf_counter()
        if not placed:
            assert began < read_at + reread_s  # a pass that begins when the reread is due corrects it
    assert began > written_at
    assert ended >= before_first + reread_s  # corrected by the reread, not by anything the journal saw
    _assert_same_holdings(engine.holdings, _fresh_holdings(store))
    assert list(engine.holdings.jobs) == placed
