"""Where bench.e2e's coordinator CPU per run goes, by phase, measured (user+system from /proc) rather than
profiled: the same single-job runs of `true` and the same client as bench.e2e, taken apart.

1. submit: JOBS runs through SubmitRun (bench.e2e's 16 concurrent submitters) into a coordinator with no
   agent: each run stored and queued, nothing dispatched;
2. get: one GetRun per run (bench.e2e's wait asks each run once it has submitted them all);
3. run: AGENTS real agents connect and run the queued jobs (dispatch, scheduling passes, the agents'
   reports, run completion), waited for without asking the coordinator (its log of finished runs is not
   read: the agents' own CPU shows when they are idle again); then bench.e2e itself, for the whole.

Usage: python -m bench.e2e_split [JOBS] [AGENTS] [--rounds 3] [--plaintext]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

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


def one_round(jobs: int, agents: int, tls: bool) -> dict[str, dict[str, float]]:
    svc = Services(tls=tls)
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

        out: dict[str, dict[str, float]] = {}
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
    a = p.parse_args()
    rounds: list[dict[str, dict[str, float]]] = []
    for r in range(a.rounds):
        one = one_round(a.jobs, a.agents, not a.plaintext)
        rounds.append(one)
        print(f"round {r}: " + ", ".join(f"{k} {v['all']:.3f}" for k, v in one.items()) + " ms/run", flush=True)
    print(
        f"coordinator CPU ms per single-job run, medians of {a.rounds} rounds of {a.jobs}"
        f" (load {os.getloadavg()[0]:.1f});"
        " run: dispatch, passes, reports, completion (and the agents' start); e2e: bench.e2e's whole round"
    )
    for phase in rounds[0]:
        kinds = rounds[0][phase]
        print(f"  {phase:>7}: " + ", ".join(f"{k} {statistics.median(r[phase][k] for r in rounds):.3f}" for k in kinds))


if __name__ == "__main__":
    main()
