"""Coordinator scale (issue 16 item 5): thousands of simulated agents on real gRPC connections, a deep
queue, and single-job runs dispatched through the real API, against one coordinator process.

Phases, each with its figures: QUEUED + one run per agent are submitted (SubmitRuns); the agents enrol
and connect (bench/loadgen.py: their own TLS connection each, heartbeats at the interval the coordinator
asks) and each holds the job it gets, so QUEUED runs wait (--fill-with-agents: the agents connect first,
and the fill then pays for their heartbeats too); with the queue full, `ListRuns`
(the call behind `dstack ps`, its first page) is timed and the pool is watched for a lease timeout; then
the agents are released (each job DONE at once) and the queue drains; then RUNS more single-job runs go
through submit -> dispatch -> done, one SubmitRun per run (the old path) and SUBMIT_BATCH runs per
SubmitRuns call. Scheduling passes are read from the coordinator's /metrics histogram, agents marked
lost from its counter, RSS sampled throughout, the coordinator's wall and CPU time per phase, and what it
logged at WARNING and above (by message).

Baseline in the same run: the same phases at a tenth of the size first. Targets are the issue's.
Usage: python -m bench.scale [AGENTS] [QUEUED] [RUNS] [--procs N] [--no-baseline] [--fill-with-agents]
  [--fill-batch N] [--fill-in-flight N] [--submitters N] [--steady-s S] [--cli-ps N] [--gc-log]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import psutil

from bench._harness import ADMIN, JOIN, Services, meta, pct
from bench.loadgen import AgentStats, Fleet, SubmitStats, Target, submit_runs
from dstack.protos.v1 import client_pb2

SUBMIT_BATCH = 100  # runs per SubmitRuns call (the batched single-job phase)
# The fill: runs per SubmitRuns call and calls in flight per submitter process (--fill-batch,
# --fill-in-flight). On the shared 2-core machine the fill is bound by the CPU share the coordinator gets,
# not by the calls: its CPU per run stored was 0.58-0.83 ms whatever the batch (100, 500, 1,000) or the
# calls in flight (2-16 per process), and the rate followed the load (377 runs/s at load 14, 137 at 31).
FILL_BATCH = 100
FILL_IN_FLIGHT = 4
GIB = 1 << 30


@dataclass
class Figures:
    agents: int
    queued: int
    runs: int
    connect_s: float = 0.0
    fill_rate: float = 0.0  # runs/s accepted while the queue filled (SubmitRuns)
    fill_s: float = 0.0  # the fill's wall time, first request to last answer
    fill_cpu_ms: float = 0.0  # the coordinator's CPU per run stored during the fill (its heartbeats too)
    queued_seen: int = 0  # runs waiting once every agent held a job
    max_rss: float = 0.0  # bytes
    ps_ms: list[float] = field(default_factory=list)  # ListRuns first page, 100k queued
    ps_finished_ms: list[float] = field(default_factory=list)  # the same once they finished
    ps100_ms: list[float] = field(default_factory=list)  # ListRuns first page of 100 (the CLI's), queue full
    cli_ps_ms: list[float] = field(default_factory=list)  # the real `dstack ps` process, queue full
    cli_floor_ms: list[float] = field(default_factory=list)  # `python -c "import grpc, typer"`, in turn with it
    max_silence_s: float = 0.0  # the coordinator's longest gap between two messages of an agent holding a lease
    drain_rate: float = 0.0  # jobs/s from the deep queue to DONE
    single_rate: float = 0.0  # single-job runs/s, one SubmitRun each, submit -> DONE
    batch_rate: float = 0.0  # single-job runs/s, SUBMIT_BATCH per SubmitRuns call
    # The coordinator's CPU time (user + sys) per job in each phase: less disturbed by a shared machine's
    # load than the wall rates beside them.
    drain_cpu_ms: float = 0.0
    single_cpu_ms: float = 0.0
    batch_cpu_ms: float = 0.0
    pass_p99_s: float = 0.0  # upper bound: the histogram bucket holding the 99th percentile
    pass_p50_s: float = 0.0
    pass_cpu_p50_s: float = 0.0  # the pass's own CPU time (dstack_scheduling_pass_cpu_seconds)
    pass_cpu_p99_s: float = 0.0
    # The passes while the deep queue drained only: (p50, p99) of wall and of CPU time, and their count.
    drain_pass: tuple[float, float, float, float, int] = (0.0, 0.0, 0.0, 0.0, 0)
    single_pass: tuple[float, float, float, float, int] = (0.0, 0.0, 0.0, 0.0, 0)
    batch_pass: tuple[float, float, float, float, int] = (0.0, 0.0, 0.0, 0.0, 0)
    passes: int = 0
    # Full passes (every waiting job's reason, position, estimate; at most about one a second over a
    # deep queue), also counted in the passes above
    full_p50_s: float = 0.0
    full_p99_s: float = 0.0
    full_passes: int = 0
    max_pass_bucket_s: float = 0.0
    lost: int = 0
    failed: int = 0  # jobs that ended failed (with a lost agent): counted in the rates' totals
    online_at_end: int = 0
    max_heartbeat_gap_s: float = 0.0  # on the load generator's side: its own lateness, not the coordinator's
    max_write_s: float = 0.0  # the load generator's longest wait for gRPC to take one message
    max_loop_lag_s: float = 0.0  # the load generator's event loops: the most one ran late
    max_lease_check_late_s: float = 0.0  # the coordinator's lease loop: the most it ran late (its stall guard's log)
    errors: int = 0  # simulated agents' failed sessions (each reconnected, as a real agent does)
    reconnected: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # those errors by cause
    submit_errors: int = 0  # runs whose submission failed (the rates count only what was stored)
    ps_failures: list[str] = field(default_factory=list)  # ListRuns samples and `dstack ps` processes that failed
    notes: list[str] = field(default_factory=list)
    # The coordinator's (wall s, CPU s) per phase: connect, fill, full queue (ps and the hold), drain, single, batch.
    phases: dict[str, tuple[float, float]] = field(default_factory=dict)
    # What the coordinator logged at WARNING and above, by message with numbers and ids blanked: what it
    # said while a simulated agent's session failed (loadgen: "stream already ended under a write").
    coordinator_said: dict[str, int] = field(default_factory=dict)
    # With --gc-log: the coordinator's garbage collections (bench/memprobe.py GcLog), summed per generation.
    gc: dict[str, Any] = field(default_factory=dict)


class Scraper:
    """The coordinator's /metrics over its HTTPS listener, with the admin token."""

    def __init__(self, svc: Services) -> None:
        path = svc.tmp / "server" / "http-url"
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.url = path.read_text().strip().rstrip("/") + "/metrics"
        self.ctx = ssl.create_default_context(cafile=str(svc.ca_file))
        self.ctx.check_hostname = False  # the generated certificate names the coordinator, not 127.0.0.1

    def read(self) -> str:
        req = urllib.request.Request(self.url, headers={"Authorization": f"Bearer {ADMIN}"})
        with urllib.request.urlopen(req, context=self.ctx, timeout=60) as resp:
            return str(resp.read().decode())

    def pass_buckets(self, name: str = "dstack_scheduling_pass_seconds") -> dict[float, float]:
        out: dict[float, float] = {}
        for m in re.finditer(rf'{name}_bucket\{{le="([^"]+)"\}} ([0-9.e+]+)', self.read()):
            out[float(m.group(1))] = float(m.group(2))
        return out

    def passes(self) -> tuple[dict[float, float], dict[float, float]]:
        """The pass histograms as they stand: wall time and CPU time."""
        return self.pass_buckets(), self.pass_buckets("dstack_scheduling_pass_cpu_seconds")

    def passes_since(
        self, before: tuple[dict[float, float], dict[float, float]]
    ) -> tuple[float, float, float, float, int]:
        """The passes since `before` (`passes`): wall p50, p99, CPU p50, p99 (bucket bounds), count."""
        walls, cpus = (
            {k: v - was.get(k, 0.0) for k, v in now.items()} for now, was in zip(self.passes(), before, strict=True)
        )
        return (
            bucket_quantile(walls, 0.5)[0],
            bucket_quantile(walls, 0.99)[0],
            bucket_quantile(cpus, 0.5)[0],
            bucket_quantile(cpus, 0.99)[0],
            bucket_quantile(walls, 0.5)[2],
        )

    def ended(self) -> int:
        """Jobs in a final state (done, failed, stopped): a job failed with a lost agent ends the wait too."""
        text = self.read()
        return sum(
            int(float(m.group(2)))
            for m in re.finditer(r'^dstack_jobs\{status="([a-z]+)"\} ([0-9.e+]+)$', text, re.M)
            if m.group(1) in ("done", "failed", "stopped")
        )

    def counter(self, name: str) -> float:
        m = re.search(rf"^{name}_total ([0-9.e+]+)$", self.read(), re.M)
        return float(m.group(1)) if m else 0.0


def passes_said(p: tuple[float, float, float, float, int]) -> str:
    wall, cpu = f"{p[0] * 1e3:g}/{p[1] * 1e3:g}", f"{p[2] * 1e3:g}/{p[3] * 1e3:g}"
    return f"{p[4]} passes, p50/p99 <= {wall} ms, their CPU time <= {cpu} ms"


def bucket_quantile(buckets: dict[float, float], q: float) -> tuple[float, float, int]:
    """(upper bound of the q-quantile, largest non-empty bucket, count) of a cumulative histogram."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if not total:
        return 0.0, 0.0, 0
    quant = next(b for b in bounds if buckets[b] >= q * total)
    top = next(b for b in bounds if buckets[b] >= total)
    return quant, top, int(total)


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc, self.max, self.stop_at = psutil.Process(pid), 0, False

    def run(self) -> None:
        while not self.stop_at:
            try:
                self.max = max(self.max, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.2)


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


# How often a wait for jobs to end reads /metrics: each scrape lists every agent (about 10 ms of the
# coordinator's CPU at 5,000), which a wait polling it every 0.2 s made part of the phase's CPU per job.
SCRAPE_EVERY_S = 5.0


def wait_ended(
    what: str, done: Callable[[], int], done_target: int, scrape: Scraper, ended_target: int, timeout: float
) -> None:
    """Until the simulated agents count `done_target` DONE acknowledgements (`done`: no cost to the
    coordinator), or, read every SCRAPE_EVERY_S only, /metrics counts `ended_target` jobs in a final state
    (a job failed with a lost agent ends the wait too)."""
    scraped = [time.monotonic()]

    def check() -> bool:
        if done() >= done_target:
            return True
        if time.monotonic() - scraped[0] < SCRAPE_EVERY_S:
            return False
        scraped[0] = time.monotonic()
        return scrape.ended() >= ended_target

    wait_until(what, check, timeout)


def time_ps(svc: Services, n: int, limit: int = 0, failures: list[str] | None = None) -> list[float]:
    """ListRuns' first page: the default 1,000 runs, or `limit` (the CLI's `dstack ps` asks for 100).
    A failed call is not timed: it goes to `failures` with its status, and the bench goes on."""
    stub = svc.client_stub()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            stub.ListRuns(client_pb2.ListRunsRequest(limit=limit), metadata=meta(), timeout=120)
        except grpc.RpcError as e:
            msg = f"ListRuns(limit={limit}) after {time.perf_counter() - t0:.1f} s: {e.code().name} {e.details()}"
            print(f"  {msg}", flush=True)
            if failures is not None:
                failures.append(msg)
            continue
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def time_cli_ps(svc: Services, n: int, failures: list[str] | None = None) -> tuple[list[float], list[float]]:
    """The real `dstack ps` as a user runs it (a fresh process: imports, TLS, the calls, the table), taking
    turns with the floor of importing grpc and typer (bench/cli_latency.py), so that the machine's load
    weighs on both alike. A `dstack ps` that exits non-zero or hangs is not timed: it goes to `failures`
    with the CLI's own message, and the bench goes on."""
    env = {**os.environ, **svc.cli_env(), "COLUMNS": "200"}
    # Bytecode cached as an installed dstack has it (bench/cli_latency.py): else every call compiles the CLI.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(svc.tmp / "pycache")
    cmds = {"ps": [sys.executable, "-m", "dstack.cli", "ps"], "floor": [sys.executable, "-c", "import grpc, typer"]}
    out: dict[str, list[float]] = {"ps": [], "floor": []}

    def run(cmd: list[str]) -> bool:
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, env=env, cwd=svc.tmp, capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            why = "still running after 180 s (killed)"
        else:
            if r.returncode == 0:
                return True
            why = f"exited {r.returncode}: {r.stderr.strip()[-300:]}"
        msg = f"{' '.join(cmd[-2:])} after {time.perf_counter() - t0:.1f} s {why}"
        print(f"  {msg}", flush=True)
        if failures is not None:
            failures.append(msg)
        return False

    run(cmds["ps"])  # warm-up
    for _ in range(n):
        for name, cmd in cmds.items():
            t0 = time.perf_counter()
            if run(cmd):
                out[name].append((time.perf_counter() - t0) * 1e3)
    return out["ps"], out["floor"]


def scenario(
    agents: int,
    queued: int,
    runs: int,
    procs: int,
    submitters: int = 2,
    fill_batch: int = FILL_BATCH,
    fill_in_flight: int = FILL_IN_FLIGHT,
    fill_first: bool = True,
    steady_s: float = 35.0,
    say: bool = True,
    cli_ps: int = 10,
    gc_log: bool = False,
) -> Figures:
    """The phases of the module's docstring at one size; `steady_s`: how long the full queue is held (over
    two lease timeouts, so a starved heartbeat would show as a lost agent); `cli_ps`: how many times the
    real `dstack ps` process is timed (each in turn with the import floor)."""
    f = Figures(agents, queued, runs)

    def log(msg: str) -> None:
        if say:
            print(f"  [{agents} agents] {msg}", flush=True)

    svc = Services()
    fleet: Fleet | None = None
    sampler: RssSampler | None = None
    gc_out = svc.tmp / "gc-probe"
    if gc_log:  # the coordinator under bench.memprobe, which times every collection (no sampler thread)
        svc.coordinator_module = "bench.memprobe"
        os.environ.update(MEMPROBE_OUT=str(gc_out), MEMPROBE_GC="1", MEMPROBE_PERIOD="0")
    try:
        svc.start_coordinator("--http-port", "0")
        assert svc.coordinator is not None
        sampler = RssSampler(svc.coordinator.pid)
        coordinator = psutil.Process(svc.coordinator.pid)

        def cpu_s() -> float:
            return float(sum(coordinator.cpu_times()[:2]))

        phase_start = [time.monotonic(), cpu_s()]

        def phase_end(name: str) -> None:
            """The coordinator's wall and CPU time since the last phase ended (or it started)."""
            now, cpu = time.monotonic(), cpu_s()
            f.phases[name] = (now - phase_start[0], cpu - phase_start[1])
            phase_start[:] = [now, cpu]

        sampler.start()
        scrape = Scraper(svc)
        target = Target(svc.address, str(svc.ca_file), JOIN, ADMIN)
        last: list[AgentStats] = []

        def stats() -> AgentStats:
            assert fleet is not None
            s = fleet.stats()
            if s.errors > (last[0].errors if last else 0):  # said as they happen; counted in the table
                log(
                    f"simulated agents: {s.errors} failed sessions so far, {s.reconnected} reconnected;"
                    f" last: {s.last_error}"
                )
            last[:] = [s]
            return s

        def phase_view() -> str:
            """Lost agents and silences so far, on both sides: where a false loss comes from."""
            text = scrape.read()
            silence = re.search(r"^dstack_agent_longest_silence_seconds ([0-9.e+-]+)$", text, re.M)
            lost = re.search(r"^dstack_agents_lost_total ([0-9.e+]+)$", text, re.M)
            s = last[0] if last else AgentStats()
            return (
                f"so far: {float(lost.group(1)) if lost else 0:.0f} agents lost, longest silence"
                f" {float(silence.group(1)) if silence else float('nan'):.1f} s (coordinator),"
                f" heartbeat gap {s.max_heartbeat_gap_s:.1f} s, write {s.max_write_s:.1f} s, event loop late"
                f" {s.max_loop_lag_s:.1f} s (load generator); {s.errors} failed sessions"
            )

        def submitted(sub: SubmitStats) -> None:
            if sub.errors:  # reported and counted; what was stored goes on
                f.submit_errors += sub.errors
                log(f"{sub.errors} submissions failed; last: {sub.last_error}")

        def connect() -> Fleet:
            nonlocal fleet  # stats() reads it while the agents connect
            t0 = time.monotonic()
            fleet = started = Fleet(target, agents, procs, hold=True)
            wait_until(f"{agents} agents to connect", lambda: stats().connected >= agents, 120 + agents / 10)
            f.connect_s = time.monotonic() - t0
            log(f"{agents} agents connected in {f.connect_s:.1f} s; {phase_view()}")
            return started

        def fill() -> SubmitStats:
            """One run per agent (each is held) and `queued` more that wait behind them."""
            c_fill = cpu_s()
            sub = submit_runs(
                target,
                queued + agents,
                procs=submitters,
                in_flight=fill_in_flight,
                batch=min(fill_batch, queued + agents),
            )
            submitted(sub)
            f.fill_s = sub.finished - sub.started
            f.fill_rate = sub.submitted / max(1e-9, f.fill_s)
            f.fill_cpu_ms = (cpu_s() - c_fill) * 1e3 / max(1, sub.submitted)
            log(
                f"{sub.submitted} runs submitted in {f.fill_s:.0f} s ({f.fill_rate:,.0f}/s, {fill_batch} per call,"
                f" {fill_in_flight} calls in flight from each of {submitters} processes"
                f"{', no agent connected yet' if fill_first else ''}); coordinator CPU {f.fill_cpu_ms:.2f} ms/run"
            )
            return sub

        if fill_first:
            # The queue first, then the agents: each agent's hello gets it a job from the deep queue. The
            # fill then costs the coordinator only its runs, not also 5,000 agents' heartbeats (a third of a
            # second of CPU per second at full size), which on a shared machine made it the longest phase.
            sub = fill()
            phase_end("fill")
            fleet = connect()
        else:
            fleet = connect()
            phase_end("connect")
            sub = fill()
        wait_until("every agent to hold a job", lambda: stats().assigned >= agents, 120 + queued / 500)
        phase_end("connect" if fill_first else "fill")
        f.queued_seen = sub.submitted - last[0].assigned
        fill_total = sub.submitted
        log(f"every agent holds a job; {f.queued_seen} wait; {phase_view()}")

        # Full queue: `dstack ps`'s call, and the pool held across two lease timeouts' worth of passes.
        fleet.reset_gap()
        f.ps_ms = time_ps(svc, 20, failures=f.ps_failures)
        f.ps100_ms = time_ps(svc, 20, 100, f.ps_failures)
        log(
            f"ListRuns first page with the queue full: 1,000 runs median {median(f.ps_ms):.0f} ms,"
            f" 100 runs (what `dstack ps` asks) median {median(f.ps100_ms):.0f} ms"
        )
        if cli_ps:
            f.cli_ps_ms, f.cli_floor_ms = time_cli_ps(svc, cli_ps, f.ps_failures)
        steady_until = time.monotonic() + steady_s
        while time.monotonic() < steady_until:
            stats()
            time.sleep(1)
        lost = scrape.counter("dstack_agents_lost")
        m = re.search(r"^dstack_agent_longest_silence_seconds ([0-9.e+-]+)$", scrape.read(), re.M)
        log(
            f"with the queue full: {lost:.0f} agents lost; longest silence {m.group(1) if m else '?'} s (coordinator),"
            f" {last[0].max_heartbeat_gap_s:.1f} s (load generator: its writes took up to {last[0].max_write_s:.1f} s,"
            f" its event loops ran up to {last[0].max_loop_lag_s:.1f} s late); coordinator RSS so far"
            f" {(sampler.max if sampler else 0) / (1 << 20):.0f} MiB"
        )
        if cli_ps:
            log(
                f"`dstack ps` (CLI process) with the queue full: median {median(f.cli_ps_ms):.0f} ms"
                f" (floor: import grpc, typer {median(f.cli_floor_ms):.0f} ms)"
            )

        phase_end("full queue")
        # Drain the deep queue: every held job ends, every later assignment ends at once.
        passes0 = scrape.passes()
        total, done0, ended0 = fill_total, stats().done, scrape.ended()
        t_rel, c_rel = time.time(), cpu_s()
        fleet.release()
        wait_ended("the queue to drain", lambda: stats().done, done0 + total, scrape, ended0 + total, 300 + total / 100)
        f.drain_rate = total / max(1e-9, last[0].last_done - t_rel)
        f.drain_cpu_ms = (cpu_s() - c_rel) * 1e3 / total
        f.drain_pass = scrape.passes_since(passes0)
        phase_end("drain")
        log(
            f"drained {total} jobs at {f.drain_rate:,.0f}/s; coordinator CPU {f.drain_cpu_ms:.2f} ms/job;"
            f" {passes_said(f.drain_pass)}; {phase_view()}"
        )

        # Single-job runs through submit -> dispatch -> DONE: one SubmitRun per run, then batched.
        for batch in (1, SUBMIT_BATCH):
            before, done0, passes0 = scrape.ended(), stats().done, scrape.passes()
            c_before = cpu_s()
            sub = submit_runs(target, runs, procs=submitters, in_flight=16 if batch == 1 else 4, batch=batch)
            submitted(sub)
            n = sub.submitted
            wait_ended(f"{n} runs to end", lambda: stats().done, done0 + n, scrape, before + n, 300 + runs / 100)
            stats()
            rate = n / max(1e-9, last[0].last_done - sub.started)
            cpu_ms = (cpu_s() - c_before) * 1e3 / max(1, n)
            passes = scrape.passes_since(passes0)
            phase_end("single" if batch == 1 else "batch")
            if batch == 1:
                f.single_rate, f.single_cpu_ms, f.single_pass = rate, cpu_ms, passes
            else:
                f.batch_rate, f.batch_cpu_ms, f.batch_pass = rate, cpu_ms, passes
            log(
                f"{runs} single-job runs, {batch} per call: {rate:,.0f} runs/s submit -> done;"
                f" coordinator CPU {cpu_ms:.2f} ms/run; {passes_said(passes)}"
            )

        f.ps_finished_ms = time_ps(svc, 20, failures=f.ps_failures)
        end = stats()
        f.max_heartbeat_gap_s, f.max_write_s, f.max_loop_lag_s = (
            end.max_heartbeat_gap_s,
            end.max_write_s,
            end.max_loop_lag_s,
        )
        f.pass_p99_s, f.max_pass_bucket_s, f.passes = bucket_quantile(scrape.pass_buckets(), 0.99)
        f.pass_p50_s = bucket_quantile(scrape.pass_buckets(), 0.5)[0]
        cpu_buckets = scrape.pass_buckets("dstack_scheduling_pass_cpu_seconds")
        f.pass_cpu_p50_s, f.pass_cpu_p99_s = (bucket_quantile(cpu_buckets, q)[0] for q in (0.5, 0.99))
        full_buckets = scrape.pass_buckets("dstack_scheduling_full_pass_seconds")
        f.full_p50_s = bucket_quantile(full_buckets, 0.5)[0]
        f.full_p99_s, _, f.full_passes = bucket_quantile(full_buckets, 0.99)
        f.lost = int(scrape.counter("dstack_agents_lost"))
        m = re.search(r"^dstack_agent_longest_silence_seconds ([0-9.e+-]+)$", scrape.read(), re.M)
        f.max_silence_s = float(m.group(1)) if m else float("nan")
        m = re.search(r'^dstack_jobs\{status="failed"\} ([0-9.e+]+)$', scrape.read(), re.M)
        f.failed = int(float(m.group(1))) if m else 0
        listed = svc.client_stub().ListAgents(client_pb2.ListAgentsRequest(), metadata=meta(), timeout=60).agents
        f.online_at_end = sum(a.status == "online" for a in listed)
        coordinator_log = (svc.tmp / "coordinator.log").read_text(errors="replace")
        late = re.findall(r"lease check ([0-9.]+) s late", coordinator_log)
        f.coordinator_said = said(coordinator_log)
        f.max_lease_check_late_s = max((float(x) for x in late), default=0.0)
        f.errors, f.reconnected, f.failures = last[0].errors, last[0].reconnected, dict(last[0].failures)
        if gc_log and (gc_out / "gc.json").exists():  # rewritten at most once a second: the last second may miss
            f.gc = json.loads((gc_out / "gc.json").read_text())
    finally:
        if fleet is not None:
            fleet.stop()
        if sampler is not None:
            sampler.stop_at = True
            f.max_rss = sampler.max
        svc.stop()
    return f


def said(log_text: str) -> dict[str, int]:
    """The coordinator's WARNING and ERROR lines by message, numbers and ids blanked (a traceback's lines
    after its first are left out)."""
    out: dict[str, int] = {}
    for line in log_text.splitlines():
        m = re.search(r" (WARNING|ERROR|CRITICAL) (.*)$", line)
        if m:
            key = re.sub(r"[0-9a-f]{8,}|[0-9]+(\.[0-9]+)?", "#", f"{m.group(1)} {m.group(2)}")[:200]
            out[key] = out.get(key, 0) + 1
    return out


def row(name: str, base: str, full: str, target: str, ok: bool | None) -> str:
    verdict = "" if ok is None else ("pass" if ok else "FAIL")
    return f"| {name} | {base} | {full} | {target} | {verdict} |"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ms(values: list[float]) -> str:
    if not values:
        return "no sample"
    return f"p50 {statistics.median(values):.0f} ms, p99 {pct(values, 99):.0f} ms ({len(values)})"


def table(base: Figures | None, full: Figures) -> str:
    def both(fn: Callable[[Figures], str]) -> tuple[str, str]:
        return (fn(base) if base else "-"), fn(full)

    lines = [
        f"| figure | baseline ({base.agents if base else '-'} agents, {base.queued if base else '-'} queued) "
        f"| {full.agents} agents, {full.queued} queued | target | |",
        "| --- | --- | --- | --- | --- |",
        row("agents connected (time)", *both(lambda f: f"{f.online_at_end} ({f.connect_s:.0f} s)"), "all", None),
        row("runs waiting with every agent busy", *both(lambda f: f"{f.queued_seen:,}"), "", None),
        row(
            "coordinator RSS, max",
            *both(lambda f: f"{f.max_rss / (1 << 20):,.0f} MiB"),
            "<= 1 GiB",
            full.max_rss <= GIB,
        ),
        row(
            "scheduling pass p99 (histogram bucket)",
            *both(lambda f: f"<= {f.pass_p99_s * 1e3:g} ms ({f.passes} passes, max <= {f.max_pass_bucket_s * 1e3:g})"),
            "<= 50 ms",
            0 < full.pass_p99_s <= 0.05,
        ),
        row("scheduling pass p50 (histogram bucket)", *both(lambda f: f"<= {f.pass_p50_s * 1e3:g} ms"), "", None),
        row(
            "scheduling pass CPU time p50 / p99 (histogram buckets)",
            *both(lambda f: f"<= {f.pass_cpu_p50_s * 1e3:g} / <= {f.pass_cpu_p99_s * 1e3:g} ms"),
            "",
            None,
        ),
        row(
            "of which full passes (reasons, positions, estimates): p50 / p99",
            *both(lambda f: f"<= {f.full_p50_s * 1e3:g} / <= {f.full_p99_s * 1e3:g} ms ({f.full_passes} passes)"),
            "",
            None,
        ),
        row("jobs failed (with lost agents)", *both(lambda f: str(f.failed)), "0", not full.failed),
        row(
            "agents marked lost", *both(lambda f: str(f.lost)), "0", not full.lost and full.online_at_end >= full.agents
        ),
        row(
            "`dstack ps` RPC (first page), queue full",
            *both(lambda f: ms(f.ps_ms)),
            "<= 300 ms",
            bool(full.ps_ms) and pct(full.ps_ms, 99) <= 300,
        ),
        row(
            "`dstack ps` RPC (first page), all finished",
            *both(lambda f: ms(f.ps_finished_ms)),
            "<= 300 ms",
            bool(full.ps_finished_ms) and pct(full.ps_finished_ms, 99) <= 300,
        ),
        row(
            "ListRuns first page of 100 (what the CLI asks), queue full",
            *both(lambda f: ms(f.ps100_ms) if f.ps100_ms else "-"),
            "<= 300 ms",
            bool(full.ps100_ms) and pct(full.ps100_ms, 99) <= 300,
        ),
        row(
            "`dstack ps` CLI process (end to end), queue full",
            *both(lambda f: ms(f.cli_ps_ms) if f.cli_ps_ms else "-"),
            "<= 300 ms",
            bool(full.cli_ps_ms) and median(full.cli_ps_ms) <= 300,
        ),
        row(
            "floor: `python -c 'import grpc, typer'`, in turn with it",
            *both(lambda f: ms(f.cli_floor_ms) if f.cli_floor_ms else "-"),
            "",
            None,
        ),
        row(
            "fill: runs/s submitted (SubmitRuns), its time",
            *both(lambda f: f"{f.fill_rate:,.0f} ({f.fill_s:,.0f} s)"),
            "",
            None,
        ),
        row(
            "coordinator CPU per run filled (its agents' heartbeats too)",
            *both(lambda f: f"{f.fill_cpu_ms:.2f} ms"),
            "",
            None,
        ),
        row(
            "coordinator wall s / CPU s per phase",
            *both(lambda f: ", ".join(f"{k} {w:,.0f}/{c:,.0f}" for k, (w, c) in f.phases.items())),
            "",
            None,
        ),
        row("deep queue drained, jobs/s", *both(lambda f: f"{f.drain_rate:,.0f}"), ">= 2,000", full.drain_rate >= 2000),
        row("coordinator CPU per drained job", *both(lambda f: f"{f.drain_cpu_ms:.2f} ms"), "", None),
        row("passes while draining", *both(lambda f: passes_said(f.drain_pass)), "", None),
        row("passes, single-job runs one per SubmitRun", *both(lambda f: passes_said(f.single_pass)), "", None),
        row(f"passes, {SUBMIT_BATCH} runs per SubmitRuns", *both(lambda f: passes_said(f.batch_pass)), "", None),
        row("single-job runs/s, one SubmitRun each", *both(lambda f: f"{f.single_rate:,.0f}"), "", None),
        row("coordinator CPU per run, one SubmitRun each", *both(lambda f: f"{f.single_cpu_ms:.2f} ms"), "", None),
        row(
            f"single-job runs/s, {SUBMIT_BATCH} per SubmitRuns",
            *both(lambda f: f"{f.batch_rate:,.0f}"),
            ">= 2,000",
            full.batch_rate >= 2000,
        ),
        row(
            f"coordinator CPU per run, {SUBMIT_BATCH} per SubmitRuns",
            *both(lambda f: f"{f.batch_cpu_ms:.2f} ms"),
            "",
            None,
        ),
        row(
            "simulated agents' failed sessions (each reconnected)",
            *both(lambda f: f"{f.errors} ({f.reconnected} reconnects)"),
            "0",
            not full.errors,
        ),
        row("submissions failed", *both(lambda f: str(f.submit_errors)), "0", not full.submit_errors),
        row(
            "`ListRuns` / `dstack ps` samples failed",
            *both(lambda f: str(len(f.ps_failures))),
            "0",
            not full.ps_failures,
        ),
        row("load generator's longest heartbeat gap", *both(lambda f: f"{f.max_heartbeat_gap_s:.1f} s"), "", None),
        row(
            "load generator: longest write / its event loops' worst lateness",
            *both(lambda f: f"{f.max_write_s:.1f} s / {f.max_loop_lag_s:.1f} s"),
            "",
            None,
        ),
        row(
            "coordinator: its lease loop's worst lateness (over 1 s: every lease renewed)",
            *both(lambda f: f"{f.max_lease_check_late_s:.1f} s"),
            "",
            None,
        ),
        row(
            "coordinator: longest silence of an agent (between two messages read)",
            *both(lambda f: f"{f.max_silence_s:.1f} s"),
            "< lease",
            None,
        ),
    ]
    if full.gc:
        for g in range(3):
            lines.append(row(f"garbage collections, generation {g}", *both(lambda f, g=g: gc_said(f, g)), "", None))  # type: ignore[misc]
    return "\n".join(lines)


def gc_said(f: Figures, gen: int) -> str:
    """One generation's collections (--gc-log): how many, their time, the longest, and those over 0.1 s."""
    if not f.gc:
        return "-"
    slow = [s for s in f.gc["slow"] if s[1] == gen]
    return (
        f"{f.gc['count'][gen]:,} in {f.gc['total_s'][gen]:.1f} s ({f.gc['cpu_s'][gen]:.1f} s CPU),"
        f" longest {f.gc['longest_s'][gen] * 1e3:,.0f} ms;"
        f" {len(slow)} over 0.1 s ({sum(s[2] for s in slow):.1f} s)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("agents", type=int, nargs="?", default=5000)
    ap.add_argument("queued", type=int, nargs="?", default=100_000)
    ap.add_argument("runs", type=int, nargs="?", default=20_000)
    ap.add_argument("--procs", type=int, default=4, help="agent worker processes")
    ap.add_argument("--submitters", type=int, default=2, help="submitter processes")
    ap.add_argument("--fill-batch", type=int, default=FILL_BATCH, help="runs per SubmitRuns call in the fill")
    ap.add_argument("--fill-in-flight", type=int, default=FILL_IN_FLIGHT, help="fill calls in flight per submitter")
    ap.add_argument(
        "--fill-with-agents",
        action="store_true",
        help="connect the agents before the fill (the order before 2026-12-01), not after it",
    )
    ap.add_argument("--no-baseline", action="store_true", help="skip the tenth-size run")
    ap.add_argument("--steady-s", type=float, default=35.0, help="how long the full queue is held")
    ap.add_argument("--cli-ps", type=int, default=10, help="times the real `dstack ps` process is timed")
    ap.add_argument("--gc-log", action="store_true", help="time the coordinator's garbage collections (bench.memprobe)")
    a = ap.parse_args()
    # A SIGTERM (timeout, kill) unwinds like Ctrl+C: the coordinator and the worker processes are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"machine: {psutil.cpu_count()} CPUs; load generator and coordinator share them", flush=True)
    base = None
    if not a.no_baseline:
        base = scenario(
            max(1, a.agents // 10),
            a.queued // 10,
            max(1, a.runs // 10),
            max(1, a.procs // 2),
            submitters=a.submitters,
            fill_batch=a.fill_batch,
            fill_in_flight=a.fill_in_flight,
            fill_first=not a.fill_with_agents,
            steady_s=a.steady_s,
            cli_ps=a.cli_ps,
            gc_log=a.gc_log,
        )
    full = scenario(
        a.agents,
        a.queued,
        a.runs,
        a.procs,
        submitters=a.submitters,
        fill_batch=a.fill_batch,
        fill_in_flight=a.fill_in_flight,
        fill_first=not a.fill_with_agents,
        steady_s=a.steady_s,
        cli_ps=a.cli_ps,
        gc_log=a.gc_log,
    )
    print(table(base, full))
    for f in (base, full):
        if f is None:
            continue
        for cause, n in sorted(f.failures.items(), key=lambda kv: -kv[1]):
            print(f"[{f.agents} agents] simulated agents' failed sessions: {n} x {cause}")
        for msg in f.ps_failures:
            print(f"[{f.agents} agents] failed sample: {msg}")
        for msg, n in sorted(f.coordinator_said.items(), key=lambda kv: -kv[1]):
            print(f"[{f.agents} agents] the coordinator logged {n} x: {msg}")


if __name__ == "__main__":
    main()
