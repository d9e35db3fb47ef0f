"""End to end with real processes: N jobs running `true` through a coordinator and local agents.

Usage: python -m bench.e2e [JOBS] [AGENTS] [JOBS_PER_RUN]
"""

from __future__ import annotations

import concurrent.futures
import sys
import time

from bench._harness import Services, meta
from protos.v1 import client_pb2, common_pb2

FINISHED = (common_pb2.RUN_STATUS_DONE, common_pb2.RUN_STATUS_FAILED, common_pb2.RUN_STATUS_STOPPED)


def run(jobs: int, agents: int, per_run: int) -> None:
    svc = Services()
    try:
        svc.start_coordinator()
        for i in range(agents):
            svc.start_agent(f"local-{i}")
        svc.wait_agents(agents)
        stub = svc.client_stub()
        spec = common_pb2.JobSpec(workflow="t", provider="bash", commands=["true"])

        def submit(k: int) -> str:
            req = client_pb2.SubmitRunRequest(workflow="t")
            for j in range(per_run):
                s = req.jobs.add()
                s.CopyFrom(spec)
                s.job_name = f"j{j}"
            return str(stub.SubmitRun(req, metadata=meta()).run.name)

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            names = list(pool.map(submit, range(jobs // per_run)))
        pending = set(names)
        while pending:  # unfinished runs only: cheap to list
            active = stub.ListRuns(client_pb2.ListRunsRequest(all=False, limit=100_000), metadata=meta()).runs
            pending &= {r.name for r in active if r.status not in FINISHED}
            if pending:
                time.sleep(0.02)
        wall = time.monotonic() - t0
        runs = stub.ListRuns(client_pb2.ListRunsRequest(all=True, limit=100_000), metadata=meta()).runs
        failed = sum(r.status != common_pb2.RUN_STATUS_DONE for r in runs)
        print(
            f"{jobs} jobs of `true` on {agents} local agent(s), {per_run} per run: {jobs / wall:,.0f} jobs/s "
            f"({wall:.2f} s, {failed} failed); coordinator RSS {svc.coordinator_rss_mib():.0f} MiB"
        )
    finally:
        svc.stop()


def main() -> None:
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    agents = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    modes = [int(sys.argv[3])] if len(sys.argv) > 3 else [1, 100]
    for per_run in modes:
        run(jobs, agents, per_run)


if __name__ == "__main__":
    main()
