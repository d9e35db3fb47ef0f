"""Soak: moderate load on one coordinator with real agents for a long while, its RSS and database sampled.

Usage: python -m bench.soak [--minutes 60] [--rate 2] [--lines 200] [--interval 60] [--archive-after 30] [--probe DIR]

Runs of one job printing `--lines` lines are submitted at `--rate` per second (2 agents, host runtime);
every `--interval` seconds the coordinator's RSS, the size of its database (with -wal and -shm), the log
lines still in it and the archived logs in its store are recorded. At the end: the series, and each
figure's slope (least squares) over the second half of the run, after the caches have warmed.

Pass criteria (issue 16): flat RSS (second-half slope under 5% of the mean RSS per hour) and bounded
log rows in the database (archiving keeps up: at most what the last few archive windows produced). The
database file also holds every run's history, which dstack keeps by design (no run is deleted unless a
user deletes it), so it grows with the runs submitted: its slope is printed, with the bytes per run.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench import memprobe
from bench._harness import Services, meta
from dstack.protos.v1 import client_pb2, common_pb2


@dataclass
class Sample:
    minute: float
    rss_mib: float
    db_mib: float
    log_rows: int
    archive_mib: float
    submitted: int


def slope_per_hour(xs_min: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against time, per hour (0 with fewer than 2 points)."""
    n = len(xs_min)
    if n < 2:
        return 0.0
    mx, my = sum(xs_min) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs_min)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs_min, ys, strict=True)) / var * 60


def dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / (1 << 20) if path.exists() else 0.0


def db_figures(state: Path) -> tuple[float, int]:
    """The database's size on disk (with its WAL) and the log lines it still holds."""
    size = sum(p.stat().st_size for p in state.glob("coordinator.db*")) / (1 << 20)
    try:
        with sqlite3.connect(f"file:{state / 'coordinator.db'}?mode=ro", uri=True, timeout=30) as c:
            # Chunks hold consecutive seqs: their lines are last - first + 1.
            found = c.execute("SELECT COALESCE(SUM(last_seq - first_seq + 1), 0) FROM log_chunks").fetchone()
            rows = int(found[0])
    except sqlite3.Error:
        rows = -1
    return size, rows


class Submitter(threading.Thread):
    """Submits runs at a steady rate until stopped (a late tick is not made up in a burst)."""

    def __init__(self, svc: Services, rate: float, lines: int) -> None:
        super().__init__(daemon=True)
        self.stub = svc.client_stub()
        self.period = 1 / rate
        self.req = client_pb2.SubmitRunRequest(workflow="soak")
        job = self.req.jobs.add()
        job.CopyFrom(common_pb2.JobSpec(workflow="soak", provider="bash", commands=[f"seq -f 'soak line %g' {lines}"]))
        job.job_name = "j"
        self.submitted = 0
        self.errors = 0
        self.last_run = ""
        self.stopping = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stopping.is_set():
            try:
                self.last_run = self.stub.SubmitRun(self.req, metadata=meta(), timeout=30).run.name
                self.submitted += 1
            except grpc.RpcError:
                self.errors += 1
            next_at = max(next_at + self.period, time.monotonic())
            self.stopping.wait(max(0.0, next_at - time.monotonic()))


def count_statuses(svc: Services) -> dict[str, int]:
    stub = svc.client_stub()
    counts: dict[str, int] = {}
    token = ""
    while True:
        page = stub.ListRuns(client_pb2.ListRunsRequest(all=True, limit=1000, page_token=token), metadata=meta())
        for r in page.runs:
            name = common_pb2.RunStatus.Name(r.status).removeprefix("RUN_STATUS_").lower()
            counts[name] = counts.get(name, 0) + 1
        token = page.next_page_token
        if not token:
            return counts


def soak(minutes: float, rate: float, lines: int, interval: float, archive_after: float, probe: str = "") -> bool:
    svc = Services()
    samples: list[Sample] = []
    if probe:  # the coordinator under bench.memprobe: what its memory is made of, sampled each interval
        svc.coordinator_module = "bench.memprobe"
        os.environ["MEMPROBE_OUT"] = str(Path(probe).resolve())
        os.environ["MEMPROBE_PERIOD"] = str(interval)
    try:
        svc.start_coordinator("--archive-logs-after", str(archive_after))
        for i in range(2):
            svc.start_agent(f"soak-{i}")
        svc.wait_agents(2)
        state = svc.tmp / "server"
        print(
            f"soak: {minutes:g} min, {rate:g} runs/s of one job printing {lines} lines, 2 agents,"
            f" logs archived {archive_after:g} s after a job ends; state in {state}",
            flush=True,
        )
        print("  min  RSS MiB  DB MiB  log rows  archive MiB  runs", flush=True)
        sub = Submitter(svc, rate, lines)
        t0 = time.monotonic()
        sub.start()
        end = t0 + minutes * 60
        next_sample = t0
        while True:
            now = time.monotonic()
            if now >= next_sample:
                db, rows = db_figures(state)
                s = Sample(
                    (now - t0) / 60, svc.coordinator_rss_mib(), db, rows, dir_mib(state / "storage"), sub.submitted
                )
                samples.append(s)
                print(
                    f"{s.minute:4.1f}  {s.rss_mib:7.1f}  {s.db_mib:6.1f}  {s.log_rows:8d}  {s.archive_mib:11.1f}"
                    f"  {s.submitted:5d}",
                    flush=True,
                )
                next_sample += interval
            if now >= end:
                break
            time.sleep(max(0.0, min(next_sample, end) - time.monotonic()))
        sub.stopping.set()
        sub.join()
        statuses = count_statuses(svc)
    finally:
        svc.stop()
    if probe:
        print(f"memory probe (python -m bench.memprobe --report {probe}):", flush=True)
        memprobe.report(Path(probe))
    return report(samples, statuses, sub.errors, rate, lines, archive_after, interval)


def report(
    samples: list[Sample],
    statuses: dict[str, int],
    errors: int,
    rate: float,
    lines: int,
    archive_after: float,
    interval: float,
) -> bool:
    late = samples[len(samples) // 2 :]
    xs = [s.minute for s in late]
    rss_slope = slope_per_hour(xs, [s.rss_mib for s in late])
    db_slope = slope_per_hour(xs, [s.db_mib for s in late])
    rows_slope = slope_per_hour(xs, [float(s.log_rows) for s in late])
    mean_rss = sum(s.rss_mib for s in late) / max(1, len(late))
    runs = samples[-1].submitted - late[0].submitted if late else 0
    hours = (late[-1].minute - late[0].minute) / 60 if len(late) > 1 else 0
    per_run_kib = db_slope * hours * 1024 / runs if runs else 0.0
    # Lines still waiting to be archived: those of the last windows (archive delay + one archiving round).
    rows_bound = int(rate * lines * (archive_after + interval + 60) * 2)
    rss_flat = rss_slope <= 0.05 * mean_rss  # shrinking is flat enough
    rows_bounded = all(0 <= s.log_rows <= rows_bound for s in late)
    print(f"runs: {statuses} ({errors} submissions refused or failed)")
    print(
        f"second half ({len(late)} samples): RSS slope {rss_slope:+.1f} MiB/h (mean {mean_rss:.0f} MiB) -> "
        f"{'flat' if rss_flat else 'GROWING'}; log rows slope {rows_slope:+,.0f}/h, at most "
        f"{max((s.log_rows for s in late), default=0):,} (bound {rows_bound:,}) -> "
        f"{'bounded' if rows_bounded else 'UNBOUNDED'}; DB file slope {db_slope:+.1f} MiB/h "
        f"(~{per_run_kib:.1f} KiB per run of history)"
    )
    return rss_flat and rows_bounded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--rate", type=float, default=2.0, help="runs submitted per second")
    p.add_argument("--lines", type=int, default=200, help="log lines each job prints")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between samples")
    p.add_argument("--archive-after", type=float, default=30.0, help="the coordinator's --archive-logs-after")
    p.add_argument("--probe", default="", help="run the coordinator under bench.memprobe, its samples in this folder")
    a = p.parse_args()
    ok = soak(a.minutes, a.rate, a.lines, a.interval, a.archive_after, a.probe)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
