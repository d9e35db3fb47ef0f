"""The scheduling pass alone, in process: its CPU time per pass and per placed job while a deep queue
drains (the engine's heads-only passes, their writes and their assignments' messages), on a real store.

AGENTS online agents (each takes one job at a time) and QUEUED single-job runs; each round, one pass
places a job on every free agent, then every placed job reports RUNNING and DONE (not timed: that is
the agent stream's path, not the pass's). CPU time is the thread's own (time.thread_time), which a
loaded machine does not inflate as it does wall time. Run it on two trees for an A/B:
`PYTHONPATH=TREE python TREE/bench/pass_cpu.py` (each tree's own engine).
Usage: python -m bench.pass_cpu [AGENTS] [QUEUED] [ROUNDS] [--steady K] [--full] [--reread-every N]

Each pass's CPU is reported as median, 90th and 99th percentile, with the garbage collections that ran
inside the timed passes (count and CPU by generation). As in the serving coordinator (coordinator/
gc_policy.py), what the fill made is frozen once it is done, and survivors of full collections are frozen.

--steady K: the steady state of a full pool instead of a drain: every agent runs a job, and before each
pass K of them end, so each pass places K. What such a pass costs beyond its K placements is its
per-pass work over every agent and every running job (issue 16: 42 ms of CPU per pass at 5,000 agents
before the heads-only pass kept the agents' states and skipped the running jobs' records).

--reread-every N (with --steady): every Nth pass is a reread pass (engine.REREAD_S due: every running
job and online agent read again), reported apart from the others. The engine rereads every 10 s of wall
time, so how many of a run's passes are rereads otherwise depends on the machine's load.

--full: each pass is a full pass (planner.plan: every waiting job's reason, position and estimate), as
every pass is while the queue is no deeper than FULL_QUEUE; a pass's pending marks are applied as the
engine applies them.
"""

from __future__ import annotations

import atexit
import gc
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.engine import Engine, Plan
from dstack.coordinator.gc_policy import GcPolicy
from dstack.coordinator.model import JobUpdate, TerminationReason
from dstack.coordinator.store import NewJob, Store
from dstack.protos.v1 import agent_pb2, common_pb2

JS = common_pb2.JobStatus


def main() -> None:
    args = sys.argv[1:]
    steady = 0
    full = "--full" in args
    if full:
        args.remove("--full")
    reread_every = 0
    if "--reread-every" in args:
        i = args.index("--reread-every")
        reread_every = int(args[i + 1])
        del args[i : i + 2]
    if "--steady" in args:
        i = args.index("--steady")
        steady = int(args[i + 1])
        del args[i : i + 2]
    agents_n = int(args[0]) if len(args) > 0 else 500
    queued = int(args[1]) if len(args) > 1 else 10_000
    rounds = int(args[2]) if len(args) > 2 else 15
    tmp = Path(tempfile.mkdtemp(prefix="dstack-pass-cpu-"))
    atexit.register(shutil.rmtree, tmp, True)  # its database: up to hundreds of MiB at full size
    config = CoordinatorConfig(state_dir=tmp, listen="127.0.0.1:0", storage_url="", admin_token="a", join_token="j")
    store = Store(tmp / "coordinator.db")
    engine = Engine(config, store, db=None)  # type: ignore[arg-type]  # the passes are called on this thread
    inv = common_pb2.Inventory(hostname="h", cpu_count=64, memory_total_bytes=256 << 30, max_jobs=1)
    agents = []
    for i in range(agents_n):
        agent_id = store.register_agent(f"sim-{i}", f"tok-{i}", b"")
        inv.hostname = f"sim-{i}"
        store.agent_online(agent_id, inv.SerializeToString(), 2**62)
        agents.append(agent_id)
    spec = common_pb2.JobSpec(job_name="main", workflow="t", provider="bash", commands=["true"]).SerializeToString()
    for k in range(0, queued, 1000):
        for _ in range(min(1000, queued - k)):
            store.create_run("admin", "t", b"", "", [], [NewJob("main", spec, 0, 0, 0, [])])
    for row in store.waiting_jobs():
        engine.queue.add_row(row)
    connected = set(agents)
    engine.hub.connected_ids = lambda: set(connected)  # type: ignore[method-assign]
    if full:
        engine.full_queue = 1 << 62
    gc.collect()
    gc.freeze()  # what the fill made, as the serving process's policy freezes what lives long
    gc.callbacks.append(GcPolicy().on_collection)
    gc.callbacks.append(COLLECTIONS)
    if steady:
        steady_state(engine, store, agents, connected, rounds, steady, full, reread_every)
        return
    per_pass: list[float] = []
    per_job: list[float] = []
    placed_total = 0
    for _ in range(rounds):
        t0 = time.thread_time()
        COLLECTIONS.timing = True
        plan = one_pass(engine, connected, full)
        engine.queue.discard(plan.done)
        msgs: dict[str, list[agent_pb2.JobAssignment]] = {}
        for a in plan.assignments:
            msgs.setdefault(a.agent_id, []).append(engine._assignment(a))
        for theirs in msgs.values():
            agent_pb2.CoordinatorMessage(assignments=theirs).SerializeToString()
        took = time.thread_time() - t0
        COLLECTIONS.timing = False
        n = len(plan.assignments)
        if not n:
            break
        placed_total += n
        per_pass.append(took)
        per_job.append(took / n)
        now = time.time_ns()
        for agent_id, theirs in msgs.items():
            updates = [JobUpdate(a.job_id, JS.JOB_STATUS_RUNNING, time_ns=now) for a in theirs]
            updates += [JobUpdate(a.job_id, JS.JOB_STATUS_DONE, TerminationReason.DONE, time_ns=now) for a in theirs]
            store.apply_job_updates(agent_id, updates)
    print(
        f"{agents_n} agents, {queued} queued: {len(per_pass)} {'full' if full else 'heads-only'} passes placed"
        f" {placed_total} jobs; pass CPU {percentiles(per_pass)},"
        f" per placed job median {statistics.median(per_job) * 1e6:.0f} us; {COLLECTIONS}"
    )


class Collections:
    """A gc.callbacks hook: the collections that ran while `timing`, by generation (count, CPU seconds)."""

    def __init__(self) -> None:
        self.timing = False
        self.count = [0, 0, 0]
        self.cpu = [0.0, 0.0, 0.0]
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if not self.timing:
            return
        if phase == "start":
            self._began = time.thread_time()
        else:
            g = info["generation"]
            self.count[g] += 1
            self.cpu[g] += time.thread_time() - self._began

    def __str__(self) -> str:
        return "collections inside passes: " + ", ".join(
            f"gen{g} {self.count[g]} ({self.cpu[g] * 1e3:.0f} ms)" for g in range(3)
        )


COLLECTIONS = Collections()


def percentiles(samples: list[float]) -> str:
    """Median, 90th and 99th percentile (nearest rank) and max, in ms."""
    s = sorted(samples)

    def rank(q: float) -> float:
        return s[min(len(s) - 1, max(0, round(q * len(s)) - 1))] * 1e3

    median = statistics.median(s) * 1e3
    return f"median {median:.1f} ms, p90 {rank(0.9):.1f} ms, p99 {rank(0.99):.1f} ms, max {s[-1] * 1e3:.1f} ms"


def one_pass(engine: Engine, connected: set[str], full: bool) -> Plan:
    """A pass as the engine's loop makes it: heads-only, or full with its pending marks applied."""
    if full:
        plan = engine._timed_plan(engine.queue.snapshot(), connected, True)
        engine.queue.mark_pending(plan.marked_pending)
        return plan
    return engine._timed_heads(engine.queue.by_user(), engine.queue.shapes(), connected, True)


def steady_state(
    engine: Engine,
    store: Store,
    agents: list[str],
    connected: set[str],
    rounds: int,
    k: int,
    full: bool,
    reread_every: int = 0,
) -> None:
    def heads_pass() -> list[tuple[str, str]]:
        plan = one_pass(engine, connected, full)
        engine.queue.discard(plan.done)
        now = time.time_ns()
        for a in plan.assignments:
            store.apply_job_updates(a.agent_id, [JobUpdate(a.job_id, JS.JOB_STATUS_RUNNING, time_ns=now)])
        return [(a.agent_id, a.job_id) for a in plan.assignments]

    running = dict(heads_pass())  # agent -> its job: every agent busy
    per_pass: list[float] = []
    rereads: list[float] = []
    for r in range(rounds):
        reread = reread_every > 0 and r % reread_every == reread_every - 1
        # Due now, or (between forced ones) not for the whole run: the wall clock decides neither.
        engine._reread_at = 0.0 if reread else (float("inf") if reread_every else engine._reread_at)
        now = time.time_ns()
        start = (r * k) % len(agents)
        for agent_id in agents[start : start + k]:
            done = JobUpdate(running[agent_id], JS.JOB_STATUS_DONE, TerminationReason.DONE, time_ns=now)
            store.apply_job_updates(agent_id, [done])
        t0 = time.thread_time()
        COLLECTIONS.timing = True
        placed = heads_pass()
        (rereads if reread else per_pass).append(time.thread_time() - t0)
        COLLECTIONS.timing = False
        running.update(placed)
    print(
        f"{len(agents)} agents all busy, {len(engine.queue)} queued, {k} placed per {'full' if full else 'heads-only'}"
        f" pass ({len(per_pass)} passes): pass CPU {percentiles(per_pass)}; {COLLECTIONS}"
    )
    if rereads:
        print(f"  and {len(rereads)} reread passes (not in the line above): pass CPU {percentiles(rereads)}")
        print(f"  all passes: pass CPU {percentiles(per_pass + rereads)}")


if __name__ == "__main__":
    main()
