"""Filling a deep queue, side by side across source trees: SubmitRuns throughput by the queue's depth.

Each round starts a coordinator from each tree in turn (alternated), connects AGENTS simulated agents
(bench/loadgen.py, each holding the job it gets, so every later run waits), then submits QUEUED
single-job runs in steps of STEP (SubmitRuns of 100 runs, two submitter processes, as bench.scale's
fill). Per step: runs/s accepted and the coordinator's user+system CPU per run (from /proc), against the
depth the queue had when the step began, and the bytes it wrote per run (the WAL and its checkpoints into
the database: a page per index an insert touches): a fill whose cost grows with the depth shows it here.

Usage: python -m bench.fill [--rounds 1] [--agents 0] [--queued 100000] [--step 10000] [LABEL=TREE ...]
       python -m bench.fill --profile FILE [...]   one fill, this tree's coordinator under bench.profiled
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench._harness import ADMIN, JOIN, REPO, Services
from bench.loadgen import Fleet, Target, submit_runs
from bench.scale import SUBMIT_BATCH, wait_until


@dataclass
class Variant:
    label: str
    tree: Path
    # depth -> per round: (runs/s, coordinator CPU ms per run, KiB written per run: the WAL and checkpoints)
    steps: dict[int, list[tuple[float, float, float]]] = field(default_factory=dict)
    totals: list[float] = field(default_factory=list)  # seconds to fill, per round
    loads: list[float] = field(default_factory=list)


def fill_once(v: Variant, agents: int, queued: int, step: int, procs: int, profile: str = "") -> None:
    svc = Services()
    svc.coordinator_tree = v.tree
    if profile:
        svc.coordinator_module = "bench.profiled"
        svc.coordinator_env = {"PROFILE_OUT": profile}
    fleet: Fleet | None = None
    try:
        svc.start_coordinator()
        assert svc.coordinator is not None
        coordinator = psutil.Process(svc.coordinator.pid)
        target = Target(svc.address, str(svc.ca_file), JOIN, ADMIN)
        if agents:
            fleet = Fleet(target, agents, procs, hold=True)
            wait_until(f"{agents} agents", lambda: fleet is not None and fleet.stats().connected >= agents, 300)
            submit_runs(target, agents, procs=2, in_flight=4, batch=SUBMIT_BATCH)
            wait_until("every agent to hold a job", lambda: fleet is not None and fleet.stats().assigned >= agents, 600)
        depth, total = 0, 0.0
        while depth < queued:
            n = min(step, queued - depth)
            load0 = os.getloadavg()[0]
            c0, t0 = sum(coordinator.cpu_times()[:2]), time.monotonic()
            w0 = coordinator.io_counters().write_chars
            sub = submit_runs(target, n, procs=2, in_flight=4, batch=SUBMIT_BATCH)
            wall = time.monotonic() - t0
            cpu = sum(coordinator.cpu_times()[:2]) - c0
            written = coordinator.io_counters().write_chars - w0
            if sub.errors:
                raise RuntimeError(f"{sub.errors} submissions failed: {sub.last_error}")
            v.steps.setdefault(depth, []).append((n / wall, cpu * 1e3 / n, written / n / 1024))
            v.loads.append((load0 + os.getloadavg()[0]) / 2)
            print(
                f"  {v.label}: depth {depth:>7,}: {n / wall:,.0f} runs/s, coordinator CPU {cpu * 1e3 / n:.3f} ms/run,"
                f" written {written / n / 1024:.1f} KiB/run,"
                f" load {v.loads[-1]:.1f}",
                flush=True,
            )
            depth += n
            total += wall
        v.totals.append(total)
    finally:
        if fleet is not None:
            fleet.stop()
        svc.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--agents", type=int, default=0)
    p.add_argument("--queued", type=int, default=100_000)
    p.add_argument("--step", type=int, default=10_000)
    p.add_argument("--procs", type=int, default=2, help="the simulated agents' worker processes")
    p.add_argument("--profile", default="", help="one fill of this tree's coordinator under bench.profiled: FILE")
    p.add_argument("variants", nargs="*", metavar="LABEL=TREE")
    a = p.parse_args()
    if a.profile:
        fill_once(Variant("profiled", REPO), a.agents, a.queued, a.step, a.procs, a.profile)
        return
    variants = [Variant(t.partition("=")[0], Path(t.partition("=")[2]).resolve()) for t in a.variants] or [
        Variant("this", REPO)
    ]
    for r in range(a.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            print(f"round {r} {v.label}", flush=True)
            fill_once(v, a.agents, a.queued, a.step, a.procs)
    print(f"{a.queued:,} runs queued behind {a.agents} agents, medians of {a.rounds} round(s):")
    for v in variants:
        print(
            f"  {v.label:>10}: fill {statistics.median(v.totals):,.0f} s, load {min(v.loads):.1f}-{max(v.loads):.1f};"
            " by depth: "
            + "; ".join(
                f"{d:,}: {statistics.median(s[0] for s in xs):,.0f}/s {statistics.median(s[1] for s in xs):.2f} ms"
                f" {statistics.median(s[2] for s in xs):.1f} KiB"
                for d, xs in sorted(v.steps.items())
            )
        )


if __name__ == "__main__":
    main()
