"""Log ingestion: one job's lines through agent -> coordinator -> `dstack logs -f`, rate and per-line lag.

Usage: python -m bench.logs [LINES] [RATE ...] [--rounds N] [--tree LABEL=PATH ...] [--trace]
(default: 1000000 lines at 200000/s, then unpaced: 0; one round of this tree)

The job (host runtime, one agent) prints LINES lines `<i> <CLOCK_MONOTONIC ns>` at RATE lines/s (in 1 ms
blocks; 0: as fast as it can) once the follower is attached; `dstack logs -f` (the real CLI) follows the
run, and this script stamps each chunk it reads from the CLI's stdout on the same host's monotonic
clock: a line's lag is when the follower printed it minus when the job wrote it. Every line must arrive
once, in order (no line lost or duplicated). Rate: lines over the time from the job's first write to the
follower's last line.

Baseline in the same run: the same generator piped straight into this script (no dstack at all).

--tree LABEL=PATH[,NAME=VALUE...] (repeatable): run the coordinator, agent and CLI of that source tree
instead (e.g. a checkout of main beside this branch), with those environment variables; with several,
each round runs every tree in turn (alternated, so a shared machine's load falls on each alike), and the
summary gives medians per tree and rate. Each run prints the load average before and after it.

--trace: the processes run under bench.logtrace, which notes when each block of lines passes each stage
(agent read, agent sent, coordinator read, DB start, stored, follower read, follower sent, CLI received,
printed); the summary gives each stage's lag (since the line's write) and each step's time (since the
stage before), medians and p99 over lines. Tracing costs CPU: take lags and rates from runs without it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench._harness import REPO, Services, meta, pct
from bench.logtrace import STAGES
from dstack.protos.v1 import client_pb2, common_pb2

# The job: waits until the follower is attached (the go file), then prints the lines, paced.
GENERATOR = r"""
import os, sys, time
n, rate, go = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
os.write(1, b"ready\n")
deadline = time.monotonic() + 120
while go and not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit("the follower never attached")
    time.sleep(0.005)
i, t0 = 0, time.monotonic_ns()
while i < n:
    now = time.monotonic_ns()
    due = n if rate <= 0 else min(n, int((now - t0) * rate / 1e9) + 1)
    if due <= i:
        time.sleep(0.0005)
        continue
    due = min(due, i + 20000)  # a block of at most 20,000 lines, each stamped when the block is written
    stamp = b" %d\n" % time.monotonic_ns()
    os.write(1, b"".join(b"%d" % k + stamp for k in range(i, due)))
    i = due
"""


@dataclass
class Result:
    lines: int
    rate: float  # lines/s, first write to last line received
    lags: list[float]  # seconds, one per line
    problems: list[str]
    cpu_us: dict[str, float] = field(default_factory=dict)  # process -> CPU microseconds per line
    written: dict[int, int] = field(default_factory=dict)  # line -> its write time (ns), kept with --trace
    printed: list[tuple[int, int, int]] = field(default_factory=list)  # (first, last line, ns) per chunk read

    def describe(self) -> str:
        lag = (
            f"lag p50 {pct(self.lags, 50) * 1e3:.1f} ms, p99 {pct(self.lags, 99) * 1e3:.1f} ms,"
            f" max {max(self.lags) * 1e3:.1f} ms"
            if self.lags
            else "no lines"
        )
        ok = "every line once, in order" if not self.problems else "; ".join(self.problems)
        cpu = ""
        if self.cpu_us:
            # What a line costs each process, whatever else the machine runs: with a core each, the
            # busiest of them bounds the rate at 1e6 / its figure.
            # A short run can cost every process less than a clock tick (0 us): then there is no bound.
            busiest = max(self.cpu_us.values())
            cpu = "; CPU per line: " + ", ".join(f"{k} {v:.1f} us" for k, v in self.cpu_us.items())
            if busiest > 0:
                cpu += f" (a core each: at most {1e6 / busiest:,.0f} lines/s)"
        return f"{self.lines:,} lines at {self.rate:,.0f} lines/s, {lag} ({ok}){cpu}"


def read_lines(
    stream: Iterator[bytes], n: int, on_ready: Callable[[], None] | None = None, keep: bool = False
) -> Result:
    """Reads `<i> <ns>` lines (other lines are the follower's own), stamping each chunk on arrival; with
    `keep`, each line's write time and each chunk's lines and arrival are kept too (for the stages)."""
    lags: list[float] = []
    problems: list[str] = []
    written: dict[int, int] = {}
    printed: list[tuple[int, int, int]] = []
    expected = 0
    first_sent = 0
    last_received = 0
    buf = b""
    for chunk in stream:
        now = time.monotonic_ns()
        buf += chunk
        *lines, buf = buf.split(b"\n")
        first_here = expected
        for line in lines:
            i_s, _, t_s = line.partition(b" ")
            if not t_s or not i_s.isdigit():
                if line.strip() == b"ready" and on_ready is not None:
                    on_ready()
                continue
            i, t = int(i_s), int(t_s)
            if i != expected:
                if len(problems) < 5:
                    problems.append(f"line {i} where {expected} was due")
                expected = i
            expected += 1
            if i == 0:
                first_sent = t
            lags.append((now - t) / 1e9)
            last_received = now
            if keep:
                written[i] = t
        if keep and expected > first_here:
            printed.append((first_here, expected - 1, now))
        if expected >= n:
            break
    if expected < n:
        problems.append(f"{n - expected} line(s) missing at the end")
    span = (last_received - first_sent) / 1e9
    return Result(len(lags), len(lags) / span if span > 0 else 0.0, lags, problems, written=written, printed=printed)


def chunks(f: int) -> Iterator[bytes]:
    while data := os.read(f, 1 << 20):
        yield data


def baseline(n: int, rate: float) -> Result:
    """The generator straight into this reader through a pipe."""
    p = subprocess.Popen([sys.executable, "-c", GENERATOR, str(n), str(rate), ""], stdout=subprocess.PIPE)
    assert p.stdout is not None
    try:
        return read_lines(chunks(p.stdout.fileno()), n)
    finally:
        p.wait()


def through_dstack(svc: Services, n: int, rate: float, trace: bool = False) -> Result:
    go = svc.tmp / f"go-{time.monotonic_ns()}"
    command = f"python3 -c {shlex.quote(GENERATOR)} {n} {rate} {go}"
    req = client_pb2.SubmitRunRequest(workflow="logs")
    job = req.jobs.add()
    job.CopyFrom(common_pb2.JobSpec(workflow="logs", provider="bash", commands=[command]))
    job.job_name = "printer"
    name = svc.client_stub().SubmitRun(req, metadata=meta(), timeout=60).run.name
    wrap = ["-m", "bench.logtrace", "cli", "dstack.cli"] if trace else ["-m", "dstack.cli"]
    follower = subprocess.Popen(
        [sys.executable, *wrap, "logs", "-f", name],
        stdout=subprocess.PIPE,
        env=svc._env(**svc.cli_env()),
        cwd=svc.tmp,
    )
    assert follower.stdout is not None
    procs = {"agent": psutil.Process(svc.procs[1].pid), "coordinator": psutil.Process(svc.procs[0].pid)}
    cpu0: dict[str, float] = {}

    def start() -> None:
        procs["follower"] = psutil.Process(follower.pid)
        cpu0.update({k: sum(p.cpu_times()[:2]) for k, p in procs.items()})
        go.touch(mode=0o644)

    try:
        # The go file is made once the follower has printed the job's first line: the lines are timed
        # from then on, not the follower's start.
        result = read_lines(chunks(follower.stdout.fileno()), n, on_ready=start, keep=trace)
        if cpu0 and result.lines:
            result.cpu_us = {k: (sum(p.cpu_times()[:2]) - cpu0[k]) / result.lines * 1e6 for k, p in procs.items()}
        return result
    finally:
        follower.wait(60)


# ---- stages (--trace) -------------------------------------------------------------------------------
def read_notes(folder: Path) -> dict[str, list[tuple[int, int, int]]]:
    """bench.logtrace's notes from every process: stage -> [(first line, last line, ns)]."""
    notes: dict[str, list[tuple[int, int, int]]] = {s: [] for s in STAGES}
    for f in sorted(folder.glob("*.tsv")):
        for row in f.read_text().splitlines():
            stage, a, b, t = row.split("\t")
            notes[stage].append((int(a), int(b), int(t)))
    return notes


def stage_times(notes: dict[str, list[tuple[int, int, int]]], n: int) -> dict[str, list[int]]:
    """stage -> each line's first time there (ns; 0 where the stage did not note it)."""
    out: dict[str, list[int]] = {}
    for stage, rows in notes.items():
        times = [0] * n
        for a, b, t in sorted(rows, key=lambda r: r[2]):
            for i in range(max(a, 0), min(b, n - 1) + 1):
                if not times[i]:
                    times[i] = t
        out[stage] = times
    return out


def stage_figures(result: Result, folder: Path, n: int) -> dict[str, tuple[float, ...]]:
    """stage -> (lag p50, lag p99, step p50, step p99, step mean) in ms, over lines, and the stage's events
    (distinct times: batches, messages, reads): the lag is since the line's write, the step since the
    stage before that noted the line (the steps' means add up to the mean lag: the budget)."""
    notes = read_notes(folder)
    notes["printed"] = result.printed
    times = stage_times(notes, n)
    written = [result.written.get(i, 0) for i in range(n)]
    out: dict[str, tuple[float, ...]] = {}
    before = written
    for stage in STAGES:
        at = times[stage]
        lags = [(t - w) / 1e9 for t, w in zip(at, written, strict=True) if t and w]
        steps = [(t - b) / 1e9 for t, b in zip(at, before, strict=True) if t and b]
        if lags:
            out[stage] = (
                *(
                    x * 1e3
                    for x in (pct(lags, 50), pct(lags, 99), pct(steps, 50), pct(steps, 99), statistics.mean(steps))
                ),
                float(len({t for _, _, t in notes[stage]})),  # events: batches sent, messages read, polls...
            )
            before = at
    return out


# ---- rounds and trees -------------------------------------------------------------------------------
@dataclass
class Figures:
    """One tree at one rate, over rounds."""

    rates: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    pipe_p50: list[float] = field(default_factory=list)
    pipe_p99: list[float] = field(default_factory=list)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    loads: list[float] = field(default_factory=list)
    stages: list[dict[str, tuple[float, ...]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def load() -> float:
    return os.getloadavg()[0]


def run_tree(
    tree: Path, env: dict[str, str], n: int, rates: list[float], trace: bool, figures: dict[float, Figures]
) -> None:
    svc = Services(tree=tree)
    svc.env.update(env)
    folder = Path(tempfile.mkdtemp(prefix="dstack-logtrace-"))
    if trace:
        svc.env["DSTACK_LOGTRACE_DIR"] = str(folder)
        svc.coordinator_wrap = ["-m", "bench.logtrace", "coordinator"]
        svc.agent_wrap = ["-m", "bench.logtrace", "agent"]
    try:
        svc.start_coordinator()
        svc.start_agent("logs-0")
        svc.wait_agents(1)
        for rate in rates:
            paced = f"paced at {rate:,.0f} lines/s" if rate > 0 else "unpaced"
            load0 = load()
            pipe = baseline(n, rate)
            print(f"  {paced}, baseline (a pipe into this script): {pipe.describe()}", flush=True)
            for f in folder.glob("*.tsv"):
                f.unlink()
            res = through_dstack(svc, n, rate, trace)
            load1 = load()
            print(f"  {paced}, job -> agent -> coordinator -> dstack logs -f: {res.describe()}", flush=True)
            print(f"  load average {load0:.1f} -> {load1:.1f}; coordinator RSS {svc.coordinator_rss_mib():.0f} MiB")
            fig = figures.setdefault(rate, Figures())
            fig.loads += [load0, load1]
            fig.problems += res.problems + pipe.problems
            if res.lags:
                fig.rates.append(res.rate)
                fig.p50.append(pct(res.lags, 50) * 1e3)
                fig.p99.append(pct(res.lags, 99) * 1e3)
            fig.pipe_p50.append(pct(pipe.lags, 50) * 1e3)
            fig.pipe_p99.append(pct(pipe.lags, 99) * 1e3)
            for k, v in res.cpu_us.items():
                fig.cpu.setdefault(k, []).append(v)
            if trace:
                time.sleep(0.3)  # the processes' trace writers write every 50 ms
                stages = stage_figures(res, folder, n)
                fig.stages.append(stages)
                print_stages(stages, "  ")
    finally:
        svc.stop()
        shutil.rmtree(folder, ignore_errors=True)


def print_stages(stages: dict[str, tuple[float, ...]], indent: str = "") -> None:
    heads = ("lag p50", "lag p99", "step p50", "step p99", "step mean", "events")
    print(f"{indent}{'stage':<14} " + " ".join(f"{h:>9}" for h in heads) + "  (ms)")
    for stage, figures in stages.items():
        print(f"{indent}{stage:<14} " + " ".join(f"{x:9.2f}" for x in figures))


def med(values: list[float]) -> str:
    return f"{statistics.median(values):,.1f} ({min(values):,.1f}-{max(values):,.1f})" if values else "-"


def summary(label: str, rate: float, fig: Figures) -> None:
    paced = f"paced {rate:,.0f}/s" if rate > 0 else "unpaced"
    cpu = ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in fig.cpu.items())
    print(
        f"{label:<10} {paced:<16} lines/s {med(fig.rates)}; lag p50 {med(fig.p50)} ms, p99 {med(fig.p99)} ms;"
        f" pipe p50 {med(fig.pipe_p50)} ms, p99 {med(fig.pipe_p99)} ms; CPU us/line {cpu};"
        f" load {min(fig.loads):.1f}-{max(fig.loads):.1f}"
        + (f"; PROBLEMS: {'; '.join(fig.problems[:3])}" if fig.problems else "")
    )
    if fig.stages:
        # Per stage: the median over rounds of each round's figure.
        merged = {
            s: tuple(statistics.median(r[s][k] for r in fig.stages if s in r) for k in range(6))
            for s in STAGES
            if any(s in r for r in fig.stages)
        }
        print_stages(merged, "    ")


def parse_tree(text: str) -> tuple[str, Path, dict[str, str]]:
    label, _, rest = text.partition("=")
    path, *env = rest.split(",")
    return label, Path(path).resolve(), dict(e.split("=", 1) for e in env)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.logs", description=__doc__.split("\n")[0])
    ap.add_argument("lines", nargs="?", type=int, default=1_000_000)
    ap.add_argument("rates", nargs="*", type=float, default=[200_000.0, 0.0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument(
        "--tree", action="append", default=[], help="LABEL=PATH[,NAME=VALUE...]: a source tree to run, with env"
    )
    ap.add_argument("--trace", action="store_true", help="per-stage timestamps (bench.logtrace)")
    args = ap.parse_args()
    trees = [parse_tree(t) for t in args.tree] or [("this", REPO, {})]
    results: dict[str, dict[float, Figures]] = {label: {} for label, _, _ in trees}
    for r in range(args.rounds):
        order = trees if r % 2 == 0 else trees[::-1]  # alternated: neither tree always runs first
        for label, tree, env in order:
            print(f"round {r + 1}, {label} ({tree} {env or ''}):", flush=True)
            run_tree(tree, env, args.lines, args.rates, args.trace, results[label])
    print(f"\nmedians (ranges) over {args.rounds} round(s), {args.lines:,} lines each:")
    for label, _, _ in trees:
        for rate in args.rates:
            summary(label, rate, results[label][rate])


if __name__ == "__main__":
    main()
