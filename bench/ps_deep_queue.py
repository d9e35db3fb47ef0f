"""`dstack ps` with a deep queue (issue 16: <= 300 ms with 100,000 queued jobs), this tree against a baseline.

A TLS coordinator with no agent gets QUEUED single-job runs through SubmitRuns (bench/loadgen.py), so they all
stay queued (0: none; the listing is then one empty page). Then the real `dstack ps`, a fresh process as a user
runs it, of this checkout and of BASELINE (another checkout, e.g. `git worktree add --detach /tmp/main main`)
take turns with the floors `python -c pass`, `import grpc` and `import grpc, typer`, ROUNDS times, so that the
load of a shared machine weighs on all of them alike. Printed: p50 and p99 of wall time and of the process's
CPU time (user + sys, which moves much less with the load than wall time), the server's own `ListRuns` page of
100 timed from here, and the load average.

How dstack is installed changes the figures: run from a checkout (`PYTHONPATH`, the default here) the
development environment's editable-install finder runs at every start (it imports pathlib and more); with
--installed each tree is built as a wheel and installed, non-editable and with its bytecode compiled, into a
virtual environment of its own (its dependencies are this interpreter's), and its `dstack` console script is
what runs: what a user's `pip install dstack` runs.
Usage: python -m bench.ps_deep_queue [QUEUED] [--baseline PATH] [--rounds N] [--installed] [--columns N]
"""

from __future__ import annotations

import argparse
import os
import resource
import site
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench._harness import ADMIN, JOIN, REPO, Services, pct
from bench.loadgen import Fleet, Target, submit_runs
from bench.scale import time_ps


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tree_env(base: dict[str, str], tree: Path, cache: Path) -> dict[str, str]:
    """The environment that runs `tree`'s CLI, with its bytecode cached as an installed dstack has it."""
    env = {**base, "PYTHONPATH": str(tree), "PYTHONPYCACHEPREFIX": str(cache / tree.name)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def install(tree: Path, into: Path) -> list[str]:
    """`tree` as a user's `pip install` leaves it: a wheel, installed non-editable (bytecode compiled) into a
    virtual environment at `into` that finds its dependencies in this interpreter's; its console script."""
    wheels = into.parent / f"{into.name}-wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(tree)],
        check=True,
        capture_output=True,
    )
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(into)], check=True)
    (purelib,) = (into / "lib").glob("python3*/site-packages")
    (purelib / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")  # a path, no hook
    (wheel,) = wheels.glob("dstack-*.whl")
    python = str(into / "bin" / "python")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
    )
    return [python, str(into / "bin" / "dstack"), "ps"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("queued", nargs="?", type=int, default=100_000)
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with (e.g. main's)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--installed", action="store_true", help="each tree as a non-editable install")
    parser.add_argument(
        "--columns", type=int, default=200, help="the terminal's width (80: a deep queue's table folds)"
    )
    parser.add_argument(
        "--agents", type=int, default=0, help="simulated agents connected throughout, each holding one job"
    )
    parser.add_argument("--procs", type=int, default=2, help="the simulated agents' worker processes")
    parser.add_argument("--coordinator", type=Path, help="the coordinator's source tree (default: this one)")
    args = parser.parse_args()
    svc = Services(tls=True)
    svc.coordinator_tree = args.coordinator.resolve() if args.coordinator else None
    fleet: Fleet | None = None
    try:
        svc.start_coordinator()
        t0 = time.monotonic()
        queued = 0
        target = Target(svc.address, str(svc.ca_file), JOIN, ADMIN)
        if args.agents:
            # The full-size load of issue 16: connected agents (heartbeats, passes over the queue), each busy.
            fleet = Fleet(target, args.agents, args.procs, hold=True)
            wait_for(lambda: fleet is not None and fleet.stats().connected >= args.agents, 120 + args.agents / 10)
            print(f"{args.agents} agents connected in {time.monotonic() - t0:.0f} s", flush=True)
        if args.queued or args.agents:
            stats = submit_runs(target, args.queued + args.agents, procs=2, batch=1000)
            queued = stats.submitted - args.agents
            if fleet is not None:
                wait_for(lambda: fleet is not None and fleet.stats().assigned >= args.agents, 120 + args.queued / 500)
            print(
                f"submitted {stats.submitted} runs ({stats.errors} refused or failed"
                f"{': ' + stats.last_error if stats.errors else ''}) in {time.monotonic() - t0:.0f} s;"
                f" load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        base = {**{k: v for k, v in os.environ.items() if not k.startswith("DSTACK_")}, **svc.cli_env()}
        base["DSTACK_HOME"] = str(svc.tmp / "home")
        base["COLUMNS"] = str(args.columns)
        cache = svc.tmp / "pycache"
        trees = {Path(REPO).name: Path(REPO)}
        if args.baseline:
            trees[f"{args.baseline.name}, baseline"] = args.baseline.resolve()
        here = tree_env(base, Path(REPO), cache)
        ps_cmds: dict[str, tuple[list[str], dict[str, str]]] = {}
        for i, (name, tree) in enumerate(trees.items()):
            if args.installed:
                bare = {k: v for k, v in base.items() if k != "PYTHONPATH"}
                ps_cmds[f"dstack ps ({name}, installed)"] = (install(tree, svc.tmp / f"venv{i}"), bare)
            else:
                ps_cmds[f"dstack ps ({name})"] = (
                    [sys.executable, "-m", "dstack.cli", "ps"],
                    tree_env(base, tree, cache),
                )
        # The floors run by the interpreter that runs `dstack ps`: an installed one has no editable finder.
        py, floor_env = sys.executable, here
        if args.installed:
            installed, floor_env = next(iter(ps_cmds.values()))
            py = installed[0]
        cmds = {
            "floor: python -c pass": ([py, "-c", "pass"], floor_env),
            "floor: import grpc": ([py, "-c", "import grpc"], floor_env),
            "floor: import grpc, typer": ([py, "-c", "import grpc, typer"], floor_env),
            **ps_cmds,
        }
        for name, (cmd, env) in cmds.items():  # warm-up: bytecode written, and the output checked once
            r = subprocess.run(cmd, env=env, cwd=svc.tmp, capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")
            if name.startswith("dstack ps"):
                print(f"  {name}: {r.stdout.count(chr(10))} lines; stderr: {r.stderr.strip()}")
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
        print(
            f"{queued} queued, {args.columns} columns, {args.rounds} rounds,"
            f" load {min(loads):.1f}-{max(loads):.1f} (median {statistics.median(loads):.1f}):"
        )
        for name in cmds:
            print(
                f"  {name:42s} wall p50 {pct(wall[name], 50):6.0f} p99 {pct(wall[name], 99):6.0f} ms;"
                f" CPU p50 {pct(cpu[name], 50):5.0f} p99 {pct(cpu[name], 99):5.0f} ms"
            )
        name = "ListRuns page of 100, from this process"
        print(f"  {name:42s} wall p50 {pct(page, 50):6.0f} p99 {pct(page, 99):6.0f} ms")
        if fleet is not None:
            s = fleet.stats()
            print(f"  simulated agents: {s.connected} connected, {s.errors} failed sessions ({s.last_error or '-'})")
    finally:
        if fleet is not None:
            fleet.stop()
        svc.stop()


def wait_for(ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"not ready after {timeout:.0f} s")
        time.sleep(0.5)


if __name__ == "__main__":
    main()
