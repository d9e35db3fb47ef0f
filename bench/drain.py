"""The deep queue's drain, side by side across source trees: coordinator CPU per dispatched job.

Each round starts a coordinator from each tree in turn (alternated, so a shared machine's load falls on
every tree alike), connects AGENTS simulated agents (bench/loadgen.py: real gRPC over TLS, `max_jobs` 1,
each assignment answered with RUNNING and DONE in one message once released), fills the queue with
QUEUED single-job runs behind one held job per agent, then releases the agents and times the drain
to the last DONE. Figures per tree, medians over rounds: jobs/s and the coordinator's user+system CPU
per drained job (from /proc: load disturbs it far less than the wall rate), and the load average.
The load generator is this tree's for every variant: only the coordinator differs.

Usage: python -m bench.drain [--rounds 3] [--agents 200] [--queued 5000] [--procs 2]
                             [--profile FILE] [LABEL=TREE ...]   (default: this tree alone)
--profile: this tree's coordinator under bench.profiled (every thread under cProfile), one round.
"""

from __future__ import annotations

import argparse
import os
import pstats
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
    rates: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    threads: list[dict[str, float]] = field(default_factory=list)
    writes: list[float] = field(default_factory=list)
    beat_writes: list[float] = field(default_factory=list)


CLK_TCK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user+system) of a process's threads so far, by kind: its event loop (the main thread),
    gRPC's C-core threads (named by gRPC; TLS and HTTP/2 framing), and the rest (Python threads: the DB
    thread, the readers, asyncio.to_thread's workers). What bounds a drain is where its CPU goes."""
    out = {"event loop": 0.0, "grpc": 0.0, "other threads": 0.0}  # other: the DB thread above all
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds = (int(fields[11]) + int(fields[12])) / CLK_TCK
        kind = "event loop" if task.name == str(pid) else "grpc" if _grpc_thread(comm) else "other threads"
        out[kind] += seconds
    return out


def _grpc_thread(comm: str) -> bool:
    # gRPC 1.6x's C-core names its threads so; Python's threads keep the process's name ("python").
    return comm.startswith(("event_engine", "grpc", "lifeguard", "default-exec", "resolver-exec"))


def drain_once(
    tree: Path, agents: int, queued: int, procs: int, profile: str = "", fill_only: bool = False
) -> tuple[float, float, float, dict[str, float], tuple[float, float]]:
    """One coordinator from `tree`: (jobs/s drained, coordinator CPU ms per drained job, load average, CPU
    ms per drained job by kind of thread (`thread_cpu`), the coordinator's messages to its agents per drained
    job (each a write on a stream, counted by the simulated agents) and, of them, heartbeats' acks alone;
    threads that ended during the drain are not in it).
    `fill_only`: stops once the queue is full (bench.drain --profile subtracts that run's profile)."""
    svc = Services()
    svc.coordinator_tree = tree
    if profile:
        svc.coordinator_module = "bench.profiled"
        svc.coordinator_env = {"PROFILE_OUT": profile, "PROFILE_MAIN_OUT": profile + ".loop"}
    fleet: Fleet | None = None
    try:
        svc.start_coordinator()
        assert svc.coordinator is not None
        coordinator = psutil.Process(svc.coordinator.pid)
        target = Target(svc.address, str(svc.ca_file), JOIN, ADMIN)
        fleet = Fleet(target, agents, procs, hold=True)
        wait_until(f"{agents} agents to connect", lambda: fleet is not None and fleet.stats().connected >= agents, 300)
        sub = submit_runs(target, queued + agents, procs=2, in_flight=4, batch=SUBMIT_BATCH)
        total = sub.submitted
        wait_until("every agent to hold a job", lambda: fleet is not None and fleet.stats().assigned >= agents, 600)
        time.sleep(2)  # the fill's last full passes and writes settle before the clock starts
        if fill_only:
            return 0.0, 0.0, os.getloadavg()[0], {}, (0.0, 0.0)
        load0 = os.getloadavg()[0]
        start = fleet.stats()
        t0, c0, threads0 = time.time(), sum(coordinator.cpu_times()[:2]), thread_cpu(coordinator.pid)
        fleet.release()
        # Counted by the simulated agents (each DONE acknowledged), not read from /metrics: a scrape costs
        # the coordinator ~10 ms of CPU (every agent listed), which would count as the drain's.
        wait_until("the queue to drain", lambda: fleet is not None and fleet.stats().done >= total, 600 + total / 50)
        cpu = sum(coordinator.cpu_times()[:2]) - c0
        threads = {k: (v - threads0.get(k, 0.0)) * 1e3 / total for k, v in thread_cpu(coordinator.pid).items()}
        end = fleet.stats()
        rate, load = total / max(1e-9, end.last_done - t0), (load0 + os.getloadavg()[0]) / 2
        beats = end.received_lease_acks - start.received_lease_acks
        return rate, cpu * 1e3 / total, load, threads, ((end.received - start.received) / total, beats / total)
    finally:
        if fleet is not None:
            fleet.stop()
        svc.stop()


def drained_profile(whole: str, fill: str, out: str) -> None:
    """`whole` less `fill`, function by function (counts and times; callers kept from `whole`): what
    the drain itself cost, without the start-up and the fill that came before it."""
    total, before = pstats.Stats(whole), pstats.Stats(fill)
    base = before.stats  # type: ignore[attr-defined]
    diff = {}
    for func, (cc, nc, tt, ct, callers) in total.stats.items():  # type: ignore[attr-defined]
        bcc, bnc, btt, bct, _ = base.get(func, (0, 0, 0.0, 0.0, {}))
        if nc - bnc > 0:
            diff[func] = (max(0, cc - bcc), nc - bnc, max(0.0, tt - btt), max(0.0, ct - bct), callers)
    total.stats = diff  # type: ignore[attr-defined]
    total.dump_stats(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--agents", type=int, default=200)
    p.add_argument("--queued", type=int, default=5000)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--profile", default="")
    p.add_argument("variants", nargs="*", metavar="LABEL=TREE")
    a = p.parse_args()
    if a.profile:
        drain_once(REPO, a.agents, a.queued, a.procs, a.profile + ".fill", fill_only=True)
        rate, cpu_ms, load, _, _ = drain_once(REPO, a.agents, a.queued, a.procs, a.profile + ".all")
        drained_profile(a.profile + ".all", a.profile + ".fill", a.profile)
        drained_profile(a.profile + ".all.loop", a.profile + ".fill.loop", a.profile + ".loop")
        print(f"profiled: {rate:,.0f} jobs/s, coordinator CPU {cpu_ms:.2f} ms/job (under cProfile), load {load:.1f}")
        print(f"{a.profile}: the drain's own profile (the whole run's less a fill-only run's)")
        print(f"{a.profile}.loop: the same, of its event loop's thread alone")
        return
    variants = [Variant(t.partition("=")[0], Path(t.partition("=")[2]).resolve()) for t in a.variants] or [
        Variant("this", REPO)
    ]
    for r in range(a.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            rate, cpu_ms, load, threads, (writes, beat_writes) = drain_once(v.tree, a.agents, a.queued, a.procs)
            v.writes.append(writes)
            v.beat_writes.append(beat_writes)
            v.rates.append(rate)
            v.cpu_ms.append(cpu_ms)
            v.loads.append(load)
            v.threads.append(threads)
            split = ", ".join(f"{k} {ms:.3f}" for k, ms in threads.items())
            print(
                f"round {r} {v.label}: {rate:,.0f} jobs/s, coordinator CPU {cpu_ms:.3f} ms/job ({split}),"
                f" {writes:.2f} writes/job ({beat_writes:.2f} heartbeats' acks), load {load:.1f}",
                flush=True,
            )
    print(f"{a.queued + a.agents} jobs drained by {a.agents} simulated agents, medians of {a.rounds} rounds:")
    for v in variants:
        print(
            f"  {v.label:>10}: {statistics.median(v.rates):,.0f} jobs/s, coordinator CPU"
            f" {statistics.median(v.cpu_ms):.3f} ms/job (range {min(v.cpu_ms):.3f}-{max(v.cpu_ms):.3f}; by thread:"
            f" {', '.join(f'{k} {statistics.median(t[k] for t in v.threads):.3f}' for k in v.threads[0])}),"
            f" {statistics.median(v.writes):.2f} writes/job ({statistics.median(v.beat_writes):.2f} heartbeats' acks),"
            f" load {min(v.loads):.1f}-{max(v.loads):.1f}"
        )


if __name__ == "__main__":
    main()
