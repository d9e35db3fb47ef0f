"""Where bench.e2e's coordinator CPU per run goes, by phase, measured (user+system from /proc) rather than
profiled: the same single-job runs of `true` and the same client as bench.e2e, taken apart.

0. floor: JOBS GetInfo calls from the same 16 concurrent callers: what any unary call costs the coordinator
   (gRPC aio, TLS, the auth interceptor) before its handler does anything;
1. submit: JOBS runs through SubmitRun (bench.e2e's 16 concurrent submitters) into a coordinator with no
   agent: each run stored and queued, nothing dispatched;
2. get: one GetRun per run, still queued;
3. run: AGENTS real agents connect and run the queued jobs (dispatch, scheduling passes, the agents'
   reports, run completion), waited for by asking each run until it has finished;
4. get done: one GetRun per finished run (what bench.e2e's wait asks most: each run once, usually
   finished by then); then bench.e2e itself, for the whole (`--no-e2e`: not).

`--tree LABEL=TREE` (repeatable): the coordinator from each source tree in turn (e.g. main's checkout),
rounds alternated, figures per tree; the agents and the client are this tree's.

Usage: python -m bench.e2e_split [JOBS] [AGENTS] [--rounds 3] [--plaintext] [--no-e2e] [--tree LABEL=TREE ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

import psutil

from bench._harness import Services, meta
from bench.drain import thread_cpu
from bench.e2e import FINISHED, submit_and_wait
from dstack.protos.v1 import client_pb2, client_pb2_grpc, common_pb2


def cpu(p: psutil.Process) -> dict[str, float]:
    """CPU seconds so far of the coordinator's threads by kind (bench.drain.thread_cpu), and their sum."""
    kinds = thread_cpu(p.pid)
    return {**kinds, "all": sum(kinds.values())}


def per_run(before: dict[str, float], after: dict[str, float], jobs: int) -> dict[str, float]:
    return {k: (after[k] - before.get(k, 0.0)) * 1e3 / jobs for k in after}


def one_round(
    jobs: int, agents: int, tls: bool, tree: Path | None = None, e2e: bool = True
) -> dict[str, dict[str, float]]:
    svc = Services(tls=tls)
    svc.coordinator_tree = tree
    try:
        svc.start_coordinator()
        assert svc.coordinator is not None
        coordinator = psutil.Process(svc.coordinator.pid)
        req = client_pb2.SubmitRunRequest(workflow="t")
        s = req.jobs.add()
        s.CopyFrom(common_pb2.JobSpec(workflow="t", provider="bash", commands=["true"], job_name="j0"))

        async def submit_all() -> list[str]:
            async with svc.aio_channel() as channel:
                stub = client_pb2_grpc.ClientServiceStub(channel)
                names: list[str] = []

                async def worker(k: int) -> None:
                    for _ in range(k, jobs, 16):
                        names.append((await stub.SubmitRun(req, metadata=meta())).run.name)

                await asyncio.gather(*(worker(k) for k in range(16)))
                return names

        async def floor() -> None:
            async with svc.aio_channel() as channel:
                stub = client_pb2_grpc.ClientServiceStub(channel)

                async def worker(k: int) -> None:
                    for _ in range(k, jobs, 16):
                        await stub.GetInfo(client_pb2.GetInfoRequest(), metadata=meta())

                await asyncio.gather(*(worker(k) for k in range(16)))

        out: dict[str, dict[str, float]] = {}
        c0 = cpu(coordinator)
        asyncio.run(floor())
        out["floor"] = per_run(c0, cpu(coordinator), jobs)
        c0 = cpu(coordinator)
        names = asyncio.run(submit_all())
        out["submit"] = per_run(c0, cpu(coordinator), jobs)
        stub = svc.client_stub()
        c0 = cpu(coordinator)
        for name in names:
            stub.GetRun(client_pb2.GetRunRequest(name=name), metadata=meta())
        out["get"] = per_run(c0, cpu(coordinator), jobs)
        c0 = cpu(coordinator)
        for i in range(agents):
            svc.start_agent(f"local-{i}")
        svc.wait_agents(agents)
        # The last run submitted is among the last to end (runs are dispatched in submission order): asked
        # every half second, then every run once.
        while stub.GetRun(client_pb2.GetRunRequest(name=names[-1]), metadata=meta()).run.status not in FINISHED:
            time.sleep(0.5)
        for name in names:
            while stub.GetRun(client_pb2.GetRunRequest(name=name), metadata=meta()).run.status not in FINISHED:
                time.sleep(0.5)
        ran = per_run(c0, cpu(coordinator), jobs)
        out["run"] = {k: v - out["get"][k] for k, v in ran.items()}
        c0 = cpu(coordinator)
        for name in names:
            stub.GetRun(client_pb2.GetRunRequest(name=name), metadata=meta())
        out["get done"] = per_run(c0, cpu(coordinator), jobs)
        if e2e:
            c0 = cpu(coordinator)
            submit_and_wait(svc, jobs, 1)
            out["e2e"] = per_run(c0, cpu(coordinator), jobs)
        return out
    finally:
        svc.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jobs", type=int, nargs="?", default=1000)
    p.add_argument("agents", type=int, nargs="?", default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--plaintext", action="store_true")
    p.add_argument("--no-e2e", action="store_true", help="leave out the whole bench.e2e round")
    p.add_argument("--tree", action="append", default=[], metavar="LABEL=TREE")
    a = p.parse_args()
    trees: list[tuple[str, Path | None]] = [
        (t.partition("=")[0], Path(t.partition("=")[2]).resolve()) for t in a.tree
    ] or [("this", None)]
    rounds: dict[str, list[dict[str, dict[str, float]]]] = {label: [] for label, _ in trees}
    loads: list[float] = []
    for r in range(a.rounds):
        for label, tree in trees if r % 2 == 0 else trees[::-1]:
            one = one_round(a.jobs, a.agents, not a.plaintext, tree, not a.no_e2e)
            rounds[label].append(one)
            loads.append(os.getloadavg()[0])
            print(
                f"round {r} {label}: " + ", ".join(f"{k} {v['all']:.3f}" for k, v in one.items()) + " ms/run"
                f" (load {loads[-1]:.1f})",
                flush=True,
            )
    print(
        f"coordinator CPU ms per single-job run, medians of {a.rounds} rounds of {a.jobs}"
        f" (load {min(loads):.1f}-{max(loads):.1f});"
        " floor: a GetInfo call; run: dispatch, passes, reports, completion (and the agents' start);"
        " e2e: bench.e2e's whole round"
    )
    for label, done in rounds.items():
        if len(rounds) > 1:
            print(f" {label}:")
        for phase in done[0]:
            kinds = done[0][phase]
            print(
                f"  {phase:>8}: "
                + ", ".join(
                    f"{k} {statistics.median(r[phase][k] for r in done):.3f}"
                    f" ({min(r[phase][k] for r in done):.3f}-{max(r[phase][k] for r in done):.3f})"
                    for k in kinds
                )
            )


if __name__ == "__main__":
    main()
