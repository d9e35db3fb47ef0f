"""Log ingestion: one job's lines through agent -> coordinator -> `dstack logs -f`, rate and per-line lag.

Usage: python -m bench.logs [LINES] [RATE ...]   (default: 1000000 lines at 200000/s, then unpaced: 0)

The job (host runtime, one agent) prints LINES lines `<i> <CLOCK_MONOTONIC ns>` at RATE lines/s (in 1 ms
blocks; 0: as fast as it can) once the follower is attached; `dstack logs -f` (the real CLI) follows the
run, and this script stamps each chunk it reads from the CLI's stdout on the same host's monotonic
clock: a line's lag is when the follower printed it minus when the job wrote it. Every line must arrive
once, in order (no line lost or duplicated). Rate: lines over the time from the job's first write to the
follower's last line.

Baseline in the same run: the same generator piped straight into this script (no dstack at all).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psutil

from bench._harness import Services, meta, pct
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


def read_lines(stream: Iterator[bytes], n: int, on_ready: Callable[[], None] | None = None) -> Result:
    """Reads `<i> <ns>` lines (other lines are the follower's own), stamping each chunk on arrival."""
    lags: list[float] = []
    problems: list[str] = []
    expected = 0
    first_sent = 0
    last_received = 0
    buf = b""
    for chunk in stream:
        now = time.monotonic_ns()
        buf += chunk
        *lines, buf = buf.split(b"\n")
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
        if expected >= n:
            break
    if expected < n:
        problems.append(f"{n - expected} line(s) missing at the end")
    span = (last_received - first_sent) / 1e9
    return Result(len(lags), len(lags) / span if span > 0 else 0.0, lags, problems)


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


def through_dstack(svc: Services, n: int, rate: float) -> Result:
    go = svc.tmp / f"go-{time.monotonic_ns()}"
    command = f"python3 -c {shlex.quote(GENERATOR)} {n} {rate} {go}"
    req = client_pb2.SubmitRunRequest(workflow="logs")
    job = req.jobs.add()
    job.CopyFrom(common_pb2.JobSpec(workflow="logs", provider="bash", commands=[command]))
    job.job_name = "printer"
    name = svc.client_stub().SubmitRun(req, metadata=meta(), timeout=60).run.name
    follower = subprocess.Popen(
        [sys.executable, "-m", "dstack.cli", "logs", "-f", name],
        stdout=subprocess.PIPE,
        env={**os.environ, **svc.cli_env()},
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
        result = read_lines(chunks(follower.stdout.fileno()), n, on_ready=start)
        if cpu0 and result.lines:
            result.cpu_us = {k: (sum(p.cpu_times()[:2]) - cpu0[k]) / result.lines * 1e6 for k, p in procs.items()}
        return result
    finally:
        follower.wait(60)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    rates = [float(r) for r in sys.argv[2:]] or [200_000.0, 0.0]
    svc = Services()
    try:
        svc.start_coordinator()
        svc.start_agent("logs-0")
        svc.wait_agents(1)
        for rate in rates:
            paced = f"paced at {rate:,.0f} lines/s" if rate > 0 else "unpaced"
            print(f"{paced}, baseline (a pipe into this script): {baseline(n, rate).describe()}", flush=True)
            print(f"{paced}, job -> agent -> coordinator -> dstack logs -f: {through_dstack(svc, n, rate).describe()}")
            print(f"  coordinator RSS {svc.coordinator_rss_mib():.0f} MiB", flush=True)
    finally:
        svc.stop()


if __name__ == "__main__":
    main()
