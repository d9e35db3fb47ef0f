"""The DB thread's own work per drained job, in process (no gRPC, no event loop): what `bench.drain`'s
coordinator asks of its DB thread for each single-job run, measured alone so that its CPU and its
statements can be counted exactly, and compared across source trees.

A store with AGENTS agents and QUEUED waiting single-job runs; then, until the queue is empty, a heads
pass's placement of one job per agent (`apply_schedule`), the journal drained (as the next pass does), and
every agent's RUNNING and DONE of its job in one message, in batches of BATCH messages (the report
batcher's store call, coordinator/reports.py `_apply_all`, on this thread), the journal drained again.
Per drained job: CPU (`time.thread_time`) of the placements, of the report batches and of the drains;
statements run on the writer connection (a trigger's program counted once), and rows the journal noted.

Usage: python -m bench.apply_cpu [--agents 200] [--queued 4000] [--batch 50] [--rounds 5] [LABEL=TREE ...]
Each tree runs in a fresh interpreter with `PYTHONPATH=TREE` (default: this tree), rounds alternated;
medians. `--profile FILE`: one round of this tree under cProfile (the report batches and placements).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace


def one_round(agents: int, queued: int, batch: int, profile: str = "", trace: bool = False) -> dict[str, float]:
    from dstack.coordinator.model import JobStatus, JobUpdate, TerminationReason
    from dstack.coordinator.reports import ReportBatcher
    from dstack.coordinator.store import NewJob, Placement, Store
    from dstack.protos.v1 import common_pb2

    clock = [10**18]

    def now() -> int:
        clock[0] += 1000
        return clock[0]

    spec = common_pb2.JobSpec(job_name="main", commands=["true"]).SerializeToString()
    with tempfile.TemporaryDirectory(prefix="dstack-bench-apply-") as tmp:
        s = Store(Path(tmp) / "db.sqlite", clock=now)
        ids = [s.register_agent(f"h{i}", f"tok{i}", b"") for i in range(agents)]
        for a in ids:
            s.agent_online(a, b"", 2**62)
        waiting: list[str] = []
        for _ in range(queued):
            waiting += s.create_run("u", "wf", b"", "", [], [NewJob("main", spec, 1.0, 0, 0, [])]).job_ids
        # Every job but a gang member's gets its step-cache base at submission (app/runs.py): one workflow's.
        s.conn.execute("UPDATE jobs SET cache_base = 'base-of-wf'")
        batcher = ReportBatcher(s, SimpleNamespace(sqlite_errors=0))  # type: ignore[arg-type]  # its store call only
        journal = getattr(s, "journal", None)
        if journal is not None:
            journal.drain()
        seen: list[str] = []
        if trace:  # not while timed: Python expands every statement's parameters for it, per trigger run
            s.conn.set_trace_callback(lambda sql: seen.append(sql) if not seen or seen[-1] != sql else None)
        cpu = {"place": 0.0, "reports": 0.0, "journal": 0.0}
        noted = 0
        prof = cProfile.Profile(time.thread_time) if profile else None
        if prof is not None:
            prof.enable()
        for start in range(0, queued, agents):
            jobs = waiting[start : start + agents]
            t0 = time.thread_time()
            s.apply_schedule([Placement(j, a, []) for j, a in zip(jobs, ids, strict=False)], [], [])
            t1 = time.thread_time()
            if journal is not None:
                changes = journal.drain()
                noted += len(changes.runs) if changes else 0
            t2 = time.thread_time()
            cpu["place"] += t1 - t0
            cpu["journal"] += t2 - t1
            t = clock[0]
            messages = [
                (
                    a,
                    [
                        JobUpdate(j, int(JobStatus.RUNNING), time_ns=t),
                        JobUpdate(j, int(JobStatus.DONE), TerminationReason.DONE, exit_code=0, time_ns=t + 1),
                    ],
                    (),
                )
                for j, a in zip(jobs, ids, strict=False)
            ]
            for k in range(0, len(messages), batch):
                t0 = time.thread_time()
                with s.tx():  # as the executor runs a call: in its group-commit batch, in a savepoint
                    s.in_batch = True
                    s.conn.execute("SAVEPOINT call")
                    out = batcher._apply_all(messages[k : k + batch])
                    s.conn.execute("RELEASE call")
                s.in_batch = False
                cpu["reports"] += time.thread_time() - t0
                assert all(not isinstance(r, Exception) for r in out), out
            t0 = time.thread_time()
            if journal is not None:
                journal.drain()
            cpu["journal"] += time.thread_time() - t0
        if prof is not None:
            prof.disable()
            prof.dump_stats(profile)
        s.conn.set_trace_callback(None)
        done = s.conn.execute("SELECT count(*) FROM jobs WHERE status = ?", [int(JobStatus.DONE)]).fetchone()[0]
        assert done == queued, (done, queued)
        updates = sum(1 for q in seen if q.lstrip().upper().startswith(("UPDATE", "INSERT", "DELETE")))
        s.close()
    if trace:
        return {"statements": len(seen) / queued, "writes": updates / queued}
    per = {f"{k} µs": v / queued * 1e6 for k, v in cpu.items()}
    per["total µs"] = sum(cpu.values()) / queued * 1e6
    return per


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--agents", type=int, default=200)
    p.add_argument("--queued", type=int, default=4000)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile", default="")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one round, JSON out
    p.add_argument("trees", nargs="*")
    a = p.parse_args()
    if a.one or a.profile:
        # Timed untraced; the statements counted in a second, traced round.
        figures = one_round(a.agents, a.queued, a.batch, a.profile)
        figures.update(one_round(a.agents, min(a.queued, 1000), a.batch, trace=True))
        print(json.dumps(figures))
        return
    trees = [t.split("=", 1) for t in a.trees] or [["this", str(Path(__file__).resolve().parent.parent)]]
    results: dict[str, list[dict[str, float]]] = {label: [] for label, _ in trees}
    loads = []
    for r in range(a.rounds):
        for label, tree in trees if r % 2 == 0 else list(reversed(trees)):
            env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
            args = ["--agents", str(a.agents), "--queued", str(a.queued), "--batch", str(a.batch), "--one"]
            # Run as a file, not `-m`: the current folder would come first on sys.path and shadow TREE.
            out = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), *args],
                env=env,
                cwd=tempfile.gettempdir(),
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results[label].append(json.loads(out.strip().splitlines()[-1]))
            loads.append(os.getloadavg()[0])
    print(f"load average {min(loads):.1f}-{max(loads):.1f}; medians over {a.rounds} rounds (range)")
    for label, rs in results.items():
        cells = []
        for key in rs[0]:
            vals = sorted(x[key] for x in rs)
            cells.append(f"{key} {statistics.median(vals):.2f} ({vals[0]:.2f}-{vals[-1]:.2f})")
        print(f"{label}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
