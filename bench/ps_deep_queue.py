"""`dstack ps` with a deep queue (issue 16: <= 300 ms with 100,000 queued jobs), this tree against a baseline.

A TLS coordinator with no agent gets QUEUED single-job runs through SubmitRuns (bench/loadgen.py), so they all
stay queued. Then the real `dstack ps`, a fresh process as a user runs it, of this checkout and of BASELINE (another
checkout, e.g. `git worktree add --detach /tmp/main main`) take turns with the import floor of the same bench
(`python -c 'import grpc, typer'`) and with `import grpc` alone, ROUNDS times, so that the load of a shared
machine weighs on all of them alike. Printed: medians of wall time and of the process's CPU time (user + sys,
which moves much less with the load than wall time), the server's own `ListRuns` page of 100 timed from here,
and the load average.
Usage: python -m bench.ps_deep_queue [QUEUED] [--baseline PATH] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench._harness import ADMIN, JOIN, REPO, Services
from bench.loadgen import Target, submit_runs
from bench.scale import time_ps


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tree_env(base: dict[str, str], tree: Path, cache: Path) -> dict[str, str]:
    """The environment that runs `tree`'s CLI, with its bytecode cached as an installed dstack has it."""
    env = {**base, "PYTHONPATH": str(tree), "PYTHONPYCACHEPREFIX": str(cache / tree.name), "COLUMNS": "200"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("queued", nargs="?", type=int, default=100_000)
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with (e.g. main's)")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    svc = Services(tls=True)
    try:
        svc.start_coordinator()
        t0 = time.monotonic()
        stats = submit_runs(Target(svc.address, str(svc.ca_file), JOIN, ADMIN), args.queued, procs=2, batch=1000)
        print(
            f"submitted {stats.submitted} runs ({stats.errors} refused or failed"
            f"{': ' + stats.last_error if stats.errors else ''}) in {time.monotonic() - t0:.0f} s;"
            f" load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        base = {**{k: v for k, v in os.environ.items() if not k.startswith("DSTACK_")}, **svc.cli_env()}
        base["DSTACK_HOME"] = str(svc.tmp / "home")
        cache = svc.tmp / "pycache"
        ps = [sys.executable, "-m", "dstack.cli", "ps"]
        here = tree_env(base, Path(REPO), cache)
        cmds: dict[str, tuple[list[str], dict[str, str]]] = {
            "floor: import grpc, typer": ([sys.executable, "-c", "import grpc, typer"], here),
            "import grpc": ([sys.executable, "-c", "import grpc"], here),
            f"dstack ps ({Path(REPO).name})": (ps, here),
        }
        if args.baseline:
            cmds[f"dstack ps ({args.baseline.name}, baseline)"] = (ps, tree_env(base, args.baseline.resolve(), cache))
        for cmd, env in cmds.values():  # warm-up: bytecode written, and the output checked once
            r = subprocess.run(cmd, env=env, cwd=svc.tmp, capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")
            if cmd is ps:
                print(f"  {r.stdout.count(chr(10))} lines; stderr: {r.stderr.strip()}")
        wall: dict[str, list[float]] = {name: [] for name in cmds}
        cpu: dict[str, list[float]] = {name: [] for name in cmds}
        loads = [os.getloadavg()[0]]
        for _ in range(args.rounds):
            for name, (cmd, env) in cmds.items():
                t, c = time.perf_counter(), children_cpu()
                subprocess.run(cmd, env=env, cwd=svc.tmp, capture_output=True, timeout=300, check=True)
                wall[name].append((time.perf_counter() - t) * 1e3)
                cpu[name].append((children_cpu() - c) * 1e3)
            loads.append(os.getloadavg()[0])
        page = time_ps(svc, args.rounds, limit=100)
        print(f"{stats.submitted} queued, {args.rounds} rounds, load {min(loads):.1f}-{max(loads):.1f}:")
        for name in cmds:
            print(
                f"  {name:42s} wall median {statistics.median(wall[name]):6.0f} ms"
                f" (min {min(wall[name]):5.0f}); CPU median {statistics.median(cpu[name]):5.0f} ms"
            )
        print(f"  {'ListRuns page of 100, from this process':42s} wall median {statistics.median(page):6.0f} ms")
    finally:
        svc.stop()


if __name__ == "__main__":
    main()
