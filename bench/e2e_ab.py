"""bench.e2e side by side across source trees (e.g. an old commit's worktree and this one), rounds
alternated so that a shared machine's load falls on every tree alike; medians per variant.

Usage: python -m bench.e2e_ab [--rounds 3] [--jobs 1000] [--agents 2] [--per-run 1] LABEL=TREE[:ARGS] ...

ARGS: bench.e2e's own options for that tree (e.g. `--plaintext`, `--agent-arg=--job-user
--agent-arg=none`) and NAME=VALUE environment variables (e.g. `DSTACK_RUNTIME=null`), space-separated.
Each run is `python -m bench.e2e JOBS AGENTS PER_RUN ARGS` in TREE with PYTHONPATH=TREE. CPU per job
is each process's user+system time from /proc (psutil, as bench.e2e prints it), the agents' summed,
so the figure does not depend on how much of the machine others took, as wall time does.
(A tree before bench.e2e had --plaintext, e.g. 0a93ad7, runs without TLS: compare it with --plaintext.)
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass, field

LINE = re.compile(
    r"([\d,]+) jobs/s \(([\d.]+) s, all submitted after ([\d.]+) s, (\d+) failed\).*"
    r"CPU \(share of one core\): coordinator (\d+)%, agents ([\d%, ]+)"
)

PER_JOB = re.compile(r"CPU per job: coordinator ([\d.]+) ms, agents ([\d.]+) ms")
JOBS_CPU = re.compile(r"jobs' processes ([\d.]+) ms")  # printed by bench.e2e since it has the figure


@dataclass
class Variant:
    label: str
    tree: str
    args: list[str]
    env: dict[str, str]
    # jobs/s; agents', coordinator's and the jobs' processes' CPU ms/job (NaN: that tree's bench.e2e does not say)
    results: list[tuple[float, float, float, float]] = field(default_factory=list)


def parse_variant(text: str) -> Variant:
    label, _, rest = text.partition("=")
    tree, _, extra = rest.partition(":")
    tokens = extra.split()
    env = dict(t.split("=", 1) for t in tokens if re.match(r"[A-Z_][A-Z0-9_]*=", t))
    return Variant(label, tree, [t for t in tokens if not re.match(r"[A-Z_][A-Z0-9_]*=", t)], env)


def run_once(
    v: Variant, jobs: int, agents: int, per_run: int, bench_from: str = ""
) -> tuple[float, float, float, float] | str:
    """`bench_from`: that tree's bench.e2e measures this variant's tree (BENCH_TREE), else the tree's own."""
    bench = bench_from or v.tree
    env = {**os.environ, "PYTHONPATH": bench, **v.env, **({"BENCH_TREE": v.tree} if bench_from else {})}
    cmd = [sys.executable, "-m", "bench.e2e", str(jobs), str(agents), str(per_run), *v.args]
    out = subprocess.run(cmd, cwd=bench, capture_output=True, text=True, env=env)
    m = LINE.search(out.stdout)
    if m is None:
        return (out.stdout + out.stderr)[-800:]
    rate = float(m[1].replace(",", ""))
    if int(m[4]):  # a failed job runs no process: its round's CPU per job would flatter the tree
        return f"{m[4]} run(s) failed: this round is left out\n" + out.stdout[-400:]
    children = float(c[1]) if (c := JOBS_CPU.search(out.stdout)) else math.nan
    if exact := PER_JOB.search(out.stdout):  # printed by bench.e2e since it has the figure itself
        return rate, float(exact[2]), float(exact[1]), children
    # An older bench.e2e prints whole percent shares only: share of one core x wall / jobs = CPU per job.
    wall = float(m[2])
    shares = [int(s) for s in re.findall(r"(\d+)%", m[6])]
    return rate, sum(shares) / 100 * wall / jobs * 1e3, int(m[5]) / 100 * wall / jobs * 1e3, children


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--agents", type=int, default=2)
    p.add_argument("--per-run", type=int, default=1)
    p.add_argument(
        "--bench-from",
        default="",
        metavar="TREE",
        help="run this tree's bench.e2e against every variant's tree (BENCH_TREE): the same figures for each",
    )
    p.add_argument("variants", nargs="+", metavar="LABEL=TREE[:ARGS]")
    a = p.parse_args()
    variants = [parse_variant(v) for v in a.variants]
    for r in range(a.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            load = os.getloadavg()[0]
            res = run_once(v, a.jobs, a.agents, a.per_run, a.bench_from)
            if isinstance(res, str):
                print(f"round {r} {v.label}: FAILED\n{res}", flush=True)
                continue
            v.results.append(res)
            print(
                f"round {r} {v.label}: {res[0]:.0f} jobs/s, agents {res[1]:.2f} ms CPU/job,"
                f" coordinator {res[2]:.2f} ms CPU/job, jobs' processes {res[3]:.2f} ms CPU/job (load {load:.1f})",
                flush=True,
            )
    print(
        "\n| variant | jobs/s | agents' CPU ms/job | coordinator CPU ms/job | jobs' processes CPU ms/job | rounds |"
        "\n|---|---|---|---|---|---|"
    )
    for v in variants:
        if v.results:
            med = [statistics.median(x[i] for x in v.results) for i in range(4)]
            print(f"| {v.label} | {med[0]:.0f} | {med[1]:.2f} | {med[2]:.2f} | {med[3]:.2f} | {len(v.results)} |")


if __name__ == "__main__":
    main()
