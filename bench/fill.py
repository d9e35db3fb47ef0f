"""Filling a deep queue, side by side across source trees: SubmitRuns throughput by the queue's depth.

Each round starts a coordinator from each tree in turn (alternated), connects AGENTS simulated agents
(bench/loadgen.py, each holding the job it gets, so every later run waits), then submits QUEUED
single-job runs in steps of STEP (SubmitRuns of 100 runs, two submitter processes, as bench.scale's
fill). Per step: runs/s accepted and the coordinator's user+system CPU per run (from /proc), against the
depth the queue had when the step began, and the bytes it wrote per run (the WAL and its checkpoints into
the database: a page per index an insert touches): a fill whose cost grows with the depth shows it here.

With --idle S, after each step the queue is left as it is for S seconds: the coordinator's CPU per second
then (heartbeats, passes, the deep queue's full passes, garbage collection) at that depth, and the full passes'
count and time from /metrics. With --gc-log the coordinator runs under bench.memprobe (MEMPROBE_GC=1) and each
step and idle window adds its garbage collections per generation (count, CPU ms): with agents connected a
fill's cost per run is in large part this background work divided by the fill's rate.

Usage: python -m bench.fill [--rounds 1] [--agents 0] [--queued 100000] [--step 10000] [--idle S] [--gc-log]
                            [LABEL=TREE ...]
       python -m bench.fill --profile FILE [...]   one fill, this tree's coordinator under bench.profiled
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench._harness import ADMIN, JOIN, REPO, Services
from bench.loadgen import Fleet, Target, submit_runs
from bench.scale import SUBMIT_BATCH, Scraper, wait_until


@dataclass
class Variant:
    label: str
    tree: Path
    # depth -> per round: (runs/s, coordinator CPU ms per run, KiB written per run: the WAL and checkpoints)
    steps: dict[int, list[tuple[float, float, float]]] = field(default_factory=dict)
    totals: list[float] = field(default_factory=list)  # seconds to fill, per round
    loads: list[float] = field(default_factory=list)
    # depth -> per round, with --idle: (coordinator CPU ms per second idle, GC CPU ms per second idle by
    # generation 0/1/2, collections per second by generation, full passes per second, their wall ms per second)
    idle: dict[int, list[tuple[float, list[float], list[float], float, float]]] = field(default_factory=dict)
    # depth -> per round, with --gc-log: GC CPU ms per run filled by generation, collections per 1,000 runs
    fill_gc: dict[int, list[tuple[list[float], list[float]]]] = field(default_factory=dict)


class GcReader:
    """The coordinator's collections so far (bench/memprobe.py's gc.json, rewritten at most once a second
    by a collection: a reading can miss the last second's)."""

    def __init__(self, out: Path) -> None:
        self.path = out / "gc.json"

    def read(self) -> tuple[list[float], list[float]]:
        """(count, CPU seconds) per generation."""
        try:
            row = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return [0.0] * 3, [0.0] * 3
        return [float(c) for c in row["count"]], [float(c) for c in row["cpu_s"]]


def full_passes(scraper: Scraper) -> tuple[float, float, float, float]:
    """Passes so far: the deep queue's full passes (count, seconds of wall time in all), then the placing
    passes (count, seconds of their CPU time in all)."""
    text = scraper.read()

    def value(name: str) -> float:
        m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    return (
        value("dstack_scheduling_full_pass_seconds_count"),
        value("dstack_scheduling_full_pass_seconds_sum"),
        value("dstack_scheduling_pass_cpu_seconds_count"),
        value("dstack_scheduling_pass_cpu_seconds_sum"),
    )


def fill_once(
    v: Variant,
    agents: int,
    queued: int,
    step: int,
    procs: int,
    profile: str = "",
    idle_s: float = 0.0,
    gc_log: bool = False,
) -> None:
    svc = Services()
    svc.coordinator_tree = v.tree
    if profile:
        svc.coordinator_module = "bench.profiled"
        svc.coordinator_env = {"PROFILE_OUT": profile}
    gcs: GcReader | None = None
    if gc_log:
        svc.coordinator_module = "bench.memprobe"
        svc.coordinator_env = {"MEMPROBE_OUT": str(svc.tmp / "gc-probe"), "MEMPROBE_GC": "1", "MEMPROBE_PERIOD": "0"}
        gcs = GcReader(svc.tmp / "gc-probe")
    fleet: Fleet | None = None
    try:
        svc.start_coordinator("--http-port", "0")
        assert svc.coordinator is not None
        coordinator = psutil.Process(svc.coordinator.pid)
        scraper = Scraper(svc)
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
            g0 = gcs.read() if gcs else None
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
            gc_said = ""
            if gcs and g0:
                (n1, c1), (n0, c0_) = gcs.read(), g0
                per_run = [(b - a) * 1e3 / n for a, b in zip(c0_, c1, strict=True)]
                per_k = [(b - a) * 1e3 / n for a, b in zip(n0, n1, strict=True)]
                v.fill_gc.setdefault(depth, []).append((per_run, per_k))
                gc_said = f", GC CPU ms/run {'/'.join(f'{x:.3f}' for x in per_run)}"
            print(
                f"  {v.label}: depth {depth:>7,}: {n / wall:,.0f} runs/s, coordinator CPU {cpu * 1e3 / n:.3f} ms/run,"
                f" written {written / n / 1024:.1f} KiB/run{gc_said},"
                f" load {v.loads[-1]:.1f}",
                flush=True,
            )
            if idle_s > 0:
                idle_window(v, depth + n, idle_s, coordinator, scraper, gcs)
            depth += n
            total += wall
        v.totals.append(total)
        if gcs:
            time.sleep(1.1)  # gc.json is rewritten at most once a second
            slow = json.loads(gcs.path.read_text()).get("slow", [])
            print(
                f"  {v.label}: collections over 0.1 s (s since start, generation, s, collected):"
                f" {', '.join(str(tuple(x)) for x in slow) or 'none'}",
                flush=True,
            )
    finally:
        if fleet is not None:
            fleet.stop()
        svc.stop()


def idle_window(
    v: Variant, depth: int, idle_s: float, coordinator: psutil.Process, scraper: Scraper, gcs: GcReader | None
) -> None:
    """The coordinator's background work at this depth: CPU, collections and full passes per second."""
    f0, g0 = full_passes(scraper), gcs.read() if gcs else None
    c0, t0 = sum(coordinator.cpu_times()[:2]), time.monotonic()
    time.sleep(idle_s)
    f1, g1, c1 = full_passes(scraper), gcs.read() if gcs else None, sum(coordinator.cpu_times()[:2])
    wall = time.monotonic() - t0
    gc_ms, gc_n = [0.0] * 3, [0.0] * 3
    if g0 and g1:
        gc_n = [(b - a) / wall for a, b in zip(g0[0], g1[0], strict=True)]
        gc_ms = [(b - a) * 1e3 / wall for a, b in zip(g0[1], g1[1], strict=True)]
    full_n, full_ms = (f1[0] - f0[0]) / wall, (f1[1] - f0[1]) * 1e3 / wall
    cpu = (c1 - c0) * 1e3 / wall
    passes, pass_ms = (f1[2] - f0[2]) / wall, (f1[3] - f0[3]) * 1e3 / wall
    v.idle.setdefault(depth, []).append((cpu, gc_ms, gc_n, full_n, full_ms))
    print(
        f"  {v.label}: idle at {depth:>7,}: coordinator CPU {cpu:.0f} ms/s,"
        f" GC CPU ms/s {'/'.join(f'{x:.1f}' for x in gc_ms)} ({'/'.join(f'{x:.1f}' for x in gc_n)} per s),"
        f" full passes {full_n:.2f}/s taking {full_ms:.0f} ms/s, placing passes {passes:.1f}/s taking"
        f" {pass_ms:.0f} ms/s of CPU, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--agents", type=int, default=0)
    p.add_argument("--queued", type=int, default=100_000)
    p.add_argument("--step", type=int, default=10_000)
    p.add_argument("--procs", type=int, default=2, help="the simulated agents' worker processes")
    p.add_argument("--profile", default="", help="one fill of this tree's coordinator under bench.profiled: FILE")
    p.add_argument("--idle", type=float, default=0.0, help="seconds the queue is left alone after each step")
    p.add_argument("--gc-log", action="store_true", help="the coordinator's collections (bench.memprobe)")
    p.add_argument("variants", nargs="*", metavar="LABEL=TREE")
    a = p.parse_args()
    if a.profile:
        fill_once(Variant("profiled", REPO), a.agents, a.queued, a.step, a.procs, a.profile, idle_s=a.idle)
        return
    variants = [Variant(t.partition("=")[0], Path(t.partition("=")[2]).resolve()) for t in a.variants] or [
        Variant("this", REPO)
    ]
    for r in range(a.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            print(f"round {r} {v.label}", flush=True)
            fill_once(v, a.agents, a.queued, a.step, a.procs, idle_s=a.idle, gc_log=a.gc_log)
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
        for d, ys in sorted(v.fill_gc.items()):
            print(
                f"  {v.label:>10}: filling at {d:,}: GC CPU ms/run by generation"
                f" {'/'.join(f'{statistics.median(y[0][g] for y in ys):.3f}' for g in range(3))},"
                " collections per 1,000 runs"
                f" {'/'.join(f'{statistics.median(y[1][g] for y in ys):.1f}' for g in range(3))}"
            )
        for d, zs in sorted(v.idle.items()):
            print(
                f"  {v.label:>10}: idle at {d:,}: CPU {statistics.median(z[0] for z in zs):.0f} ms/s"
                f" (rounds {', '.join(f'{z[0]:.0f}' for z in zs)}),"
                f" GC CPU ms/s {'/'.join(f'{statistics.median(z[1][g] for z in zs):.1f}' for g in range(3))},"
                f" collections/s {'/'.join(f'{statistics.median(z[2][g] for z in zs):.2f}' for g in range(3))},"
                f" full passes {statistics.median(z[3] for z in zs):.2f}/s,"
                f" {statistics.median(z[4] for z in zs):.0f} ms/s"
            )


if __name__ == "__main__":
    main()
