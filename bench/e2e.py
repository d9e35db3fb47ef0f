"""End to end with real processes: N jobs running `true` through a coordinator and local agents.

Usage: python -m bench.e2e [JOBS] [AGENTS] [JOBS_PER_RUN] [--plaintext] [--agent-arg ARG ...]

--plaintext: no TLS on either side (what TLS costs); --agent-arg: passed to each agent, e.g.
`--agent-arg=--job-user --agent-arg=none` (as root: jobs as the agent's user, no setpriv).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import psutil

from bench._harness import Services, meta
from dstack.protos.v1 import client_pb2, client_pb2_grpc, common_pb2

FINISHED = (common_pb2.RUN_STATUS_DONE, common_pb2.RUN_STATUS_FAILED, common_pb2.RUN_STATUS_STOPPED)


def run(jobs: int, agents: int, per_run: int, tls: bool = True, agent_args: tuple[str, ...] = ()) -> None:
    svc = Services(tls=tls)
    try:
        svc.start_coordinator()
        for i in range(agents):
            svc.start_agent(f"local-{i}", *agent_args)
        svc.wait_agents(agents)
        stub = svc.client_stub()
        spec = common_pb2.JobSpec(workflow="t", provider="bash", commands=["true"])
        req = client_pb2.SubmitRunRequest(workflow="t")
        for j in range(per_run):
            s = req.jobs.add()
            s.CopyFrom(spec)
            s.job_name = f"j{j}"

        async def submit_all() -> list[str]:
            # An efficient load generator: it shares the 2 cores with what it measures.
            async with svc.aio_channel() as channel:
                astub = client_pb2_grpc.ClientServiceStub(channel)
                names: list[str] = []

                async def worker(k: int) -> None:
                    for _ in range(k, jobs // per_run, 16):
                        names.append((await astub.SubmitRun(req, metadata=meta())).run.name)

                await asyncio.gather(*(worker(k) for k in range(16)))
                return names

        procs = [psutil.Process(p.pid) for p in svc.procs]
        cpu0 = [sum(p.cpu_times()[:2]) for p in procs]
        t0 = time.monotonic()
        names = asyncio.run(submit_all())
        submitted = time.monotonic() - t0
        for name in names:  # most are done by the time they are asked about
            while stub.GetRun(client_pb2.GetRunRequest(name=name), metadata=meta()).run.status not in FINISHED:
                time.sleep(0.02)
        wall = time.monotonic() - t0
        cpu = [(sum(p.cpu_times()[:2]) - c) / wall for p, c in zip(procs, cpu0, strict=True)]
        runs = stub.ListRuns(client_pb2.ListRunsRequest(all=True, limit=100_000), metadata=meta()).runs
        failed = sum(r.status != common_pb2.RUN_STATUS_DONE for r in runs)
        print(
            f"{jobs} jobs of `true` on {agents} local agent(s), {per_run} per run: {jobs / wall:,.0f} jobs/s "
            f"({wall:.2f} s, all submitted after {submitted:.2f} s, {failed} failed); "
            f"coordinator RSS {svc.coordinator_rss_mib():.0f} MiB; "
            f"CPU (share of one core): coordinator {cpu[0]:.0%}, agents {', '.join(f'{c:.0%}' for c in cpu[1:])};"
            f" CPU per job: coordinator {cpu[0] * wall / jobs * 1e3:.2f} ms,"
            f" agents {sum(cpu[1:]) * wall / jobs * 1e3:.2f} ms"
        )
    finally:
        svc.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jobs", type=int, nargs="?", default=1000)
    p.add_argument("agents", type=int, nargs="?", default=2)
    p.add_argument("per_run", type=int, nargs="?", help="jobs per run (default: 1, then 100)")
    p.add_argument("--plaintext", action="store_true", help="no TLS (coordinator and agents --insecure)")
    p.add_argument("--agent-arg", action="append", default=[], help="an argument for each agent (repeatable)")
    a = p.parse_args()
    for per_run in [a.per_run] if a.per_run else [1, 100]:
        run(a.jobs, a.agents, per_run, not a.plaintext, tuple(a.agent_arg))


if __name__ == "__main__":
    main()
