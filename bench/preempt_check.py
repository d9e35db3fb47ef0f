"""The lease loop's preemption check alone, in process: its CPU time per call (the engine makes one a
second) with AGENTS agents each running a job that is not interruptible and QUEUED jobs that have all
waited past `--preempt-after`: the common case at a deep queue, where nothing may be preempted.

Issue 16: with agents connected, a fill's and an idle deep queue's CPU grew with the queue's depth; part of
it was this check, which walked every long-waiting job on the event loop and built a record per running
job on the DB thread every second, only to find no interruptible job. Run it on two trees for an A/B
(each tree's own engine): `PYTHONPATH=TREE python bench/preempt_check.py AGENTS QUEUED [CALLS]`. Prints
the median and 90th percentile CPU per call (the event loop's part and the DB thread's, here one thread)
and the garbage collections the calls ran.

With `--interruptible N`, N of the running jobs are interruptible (none old enough to be preempted, so
every call does the whole check, `Engine._victims` included, and preempts nothing): the case where one
interruptible job in a deep queue made the check read every long-waiting job's row every second.

Usage: python -m bench.preempt_check [AGENTS] [QUEUED] [CALLS] [--interruptible N]
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.engine import Engine
from dstack.coordinator.model import JobUpdate
from dstack.coordinator.store import NewJob, Store
from dstack.protos.v1 import common_pb2

JS = common_pb2.JobStatus


def main() -> None:
    args = sys.argv[1:]
    interruptible = 0
    if "--interruptible" in args:
        at = args.index("--interruptible")
        interruptible = int(args[at + 1])
        del args[at : at + 2]
    agents_n = int(args[0]) if len(args) > 0 else 2000
    queued = int(args[1]) if len(args) > 1 else 30_000
    calls = int(args[2]) if len(args) > 2 else 30
    tmp = Path(tempfile.mkdtemp(prefix="dstack-preempt-check-"))
    atexit.register(shutil.rmtree, tmp, True)
    config = CoordinatorConfig(state_dir=tmp, listen="127.0.0.1:0", storage_url="", admin_token="a", join_token="j")
    config = replace(config, preempt_after_s=0.001)  # every queued job has waited past it
    store = Store(tmp / "coordinator.db")
    engine = Engine(config, store, db=None)  # type: ignore[arg-type]  # its DB calls are run on this thread

    async def on_this_thread(fn: Callable[..., Any], *a: Any) -> Any:
        return fn(*a)

    engine.db = on_this_thread  # type: ignore[assignment]
    inv = common_pb2.Inventory(hostname="h", cpu_count=64, memory_total_bytes=256 << 30, max_jobs=1)
    agents = []
    for i in range(agents_n):
        agent_id = store.register_agent(f"sim-{i}", f"tok-{i}", b"")
        inv.hostname = f"sim-{i}"
        store.agent_online(agent_id, inv.SerializeToString(), 2**62)
        agents.append(agent_id)
    spec = common_pb2.JobSpec(job_name="main", workflow="t", provider="bash", commands=["true"])
    plain = spec.SerializeToString()
    spec.resources.interruptible = True
    may_go = spec.SerializeToString()
    for i in range(agents_n + queued):  # the first ones run (the heads pass below places them)
        job = NewJob("main", may_go if i < interruptible else plain, 0, 0, 0, [])
        store.create_run("admin", "t", b"", "", [], [job])
    for row in store.waiting_jobs():
        engine.queue.add_row(row)
        engine.waits.start(row.id)
    connected = set(agents)
    engine.hub.connected_ids = lambda: set(connected)  # type: ignore[method-assign]
    plan = engine._timed_heads(engine.queue.by_user(), engine.queue.shapes(), connected, True)
    engine.queue.discard(plan.done)
    now = time.time_ns()
    for a in plan.assignments:
        store.apply_job_updates(a.agent_id, [JobUpdate(a.job_id, JS.JOB_STATUS_RUNNING, time_ns=now)])
    time.sleep(0.01)
    gc.collect()
    gc.freeze()  # what the set-up made, as the serving process's policy freezes what lives long
    counts = [0, 0, 0]

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            counts[info["generation"]] += 1

    gc.callbacks.append(count)

    async def run() -> list[float]:
        took = []
        for _ in range(calls):
            t0 = time.thread_time()
            await engine._preempt_by_policy()
            took.append(time.thread_time() - t0)
        return took

    took = sorted(asyncio.run(run()))
    print(
        f"{len(plan.assignments)} agents running a job ({interruptible} interruptible),"
        f" {len(engine.queue)} queued past --preempt-after:"
        f" preemption check CPU per call median {statistics.median(took) * 1e3:.2f} ms,"
        f" p90 {took[int(0.9 * (len(took) - 1))] * 1e3:.2f} ms;"
        f" collections in {calls} calls: {'/'.join(map(str, counts))}"
    )


if __name__ == "__main__":
    main()
