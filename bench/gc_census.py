"""What a coordinator's garbage collector walks, per connected agent and per queued job.

    python -m bench.gc_census [AGENTS] [QUEUED] [--procs N]

One coordinator under bench/memprobe.py (MEMPROBE_GC=1). A census (the objects a full collection walks,
by type, after a full collection, and how long the next full collection takes) is taken: idle after
start-up; with AGENTS simulated agents connected (bench/loadgen.py, real TLS streams); with one run per
agent, each held by its agent; and with QUEUED more runs waiting. The differences divided by the agents
or the jobs are the tracked objects each costs. Why it matters (issue 16): a full collection walks
every tracked object with the event loop stopped, so its time is the process's tracked-object count
times ~50-100 ns; CPython runs one each time the objects promoted since the last reach a quarter of
those it holds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench._harness import ADMIN, JOIN, Services
from bench.loadgen import Fleet, Target, submit_runs
from bench.scale import wait_until

SETTLE_S = 5.0  # after a phase: the passes it asks for (reasons, positions, estimates) have run


class Probe:
    def __init__(self, svc: Services, out: Path) -> None:
        self.svc, self.out, self.taken = svc, out, 0

    def census(self) -> dict[str, Any]:
        assert self.svc.coordinator is not None
        path = self.out / f"census-{self.taken}.json"
        os.kill(self.svc.coordinator.pid, signal.SIGUSR1)
        self.taken += 1
        wait_until(f"census {path.name}", path.exists, 300)
        time.sleep(0.2)  # written in one call; let it finish
        row: dict[str, Any] = json.loads(path.read_text())
        return row

    def gc_log(self) -> dict[str, Any]:
        path = self.out / "gc.json"
        return json.loads(path.read_text()) if path.exists() else {}


def per_unit(after: dict[str, Any], before: dict[str, Any], n: int, top: int = 12) -> tuple[float, list[str]]:
    a, b = Counter(dict(after["types"])), Counter(dict(before["types"]))
    grew = [(t, (a[t] - b[t]) / n) for t in a | b]
    grew.sort(key=lambda x: -x[1])
    said = [f"{t} {v:+.2f}" for t, v in grew[:top] if abs(v) >= 0.01]
    return (after["tracked"] - before["tracked"]) / n, said


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("agents", nargs="?", type=int, default=200)
    p.add_argument("queued", nargs="?", type=int, default=10_000)
    p.add_argument("--procs", type=int, default=2, help="agent worker processes")
    a = p.parse_args()
    svc = Services()
    out = svc.tmp / "probe"
    svc.coordinator_module = "bench.memprobe"
    os.environ.update(MEMPROBE_OUT=str(out), MEMPROBE_GC="1", MEMPROBE_PERIOD="0")
    fleet: Fleet | None = None
    try:
        svc.start_coordinator()
        probe = Probe(svc, out)
        target = Target(svc.address, str(svc.ca_file), JOIN, ADMIN)
        rows = [("idle", probe.census())]
        fleet = Fleet(target, a.agents, a.procs, hold=True)
        wait_until("agents to connect", lambda: fleet is not None and fleet.stats().connected >= a.agents, 600)
        time.sleep(SETTLE_S)
        rows.append((f"{a.agents} agents", probe.census()))
        submit_runs(target, a.agents, batch=100, in_flight=4)
        wait_until("every agent to hold a job", lambda: fleet is not None and fleet.stats().assigned >= a.agents, 600)
        time.sleep(SETTLE_S)
        rows.append((f"+{a.agents} held jobs", probe.census()))
        sub = submit_runs(target, a.queued, batch=100, in_flight=4)
        time.sleep(SETTLE_S)
        rows.append((f"+{sub.submitted} queued", probe.census()))
        gc_log = probe.gc_log()
    finally:
        if fleet is not None:
            fleet.stop()
        svc.stop()
    print(f"{'state':<22} {'tracked':>10} {'references':>11} {'frozen':>8} {'full GC ms':>10} {'RSS MiB':>8}")
    for name, r in rows:
        print(
            f"{name:<22} {r['tracked']:>10,} {r['references']:>11,} {r['frozen']:>8,}"
            f" {r['full_collection_s'] * 1e3:>10.1f} {r['rss']['VmRSS'] / (1 << 20):>8.0f}"
        )
    last = rows[-1][1]
    print(f"widest containers at the end: {last['widest'][:12]}")
    print(f"references by type at the end: {last['references_by_type'][:12]}")
    units = [("per agent", a.agents), ("per held job", a.agents), ("per queued job", max(1, sub.submitted))]
    for (label, n), (_, before), (_, after) in zip(units, rows, rows[1:], strict=False):
        total, said = per_unit(after, before, n)
        print(f"{label}: {total:+.1f} tracked objects; by type: {', '.join(said)}")
    if gc_log:
        gens = ", ".join(
            f"gen{g}: {n} in {s:.2f} s (longest {top * 1e3:.0f} ms)"
            for g, (n, s, top) in enumerate(zip(gc_log["count"], gc_log["total_s"], gc_log["longest_s"], strict=True))
        )
        print(f"collections over the whole run (threshold {gc_log['threshold']}): {gens}")


if __name__ == "__main__":
    main()
