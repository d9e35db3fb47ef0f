"""Dispatch latency: from SubmitRun to the job's process starting, on a warm local agent.

The job prints bash's $EPOCHREALTIME as its first action; the latency is that time minus the
moment just before the submit call. Baseline in the same run: spawning the same bash command
directly (the floor any runtime pays).
Usage: python -m bench.dispatch [N]
"""

from __future__ import annotations

import subprocess
import sys
import time

from bench._harness import Services, meta, summary_ms
from dstack.protos.v1 import client_pb2, common_pb2

CMD = 'echo "$EPOCHREALTIME"'


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    svc = Services()
    try:
        svc.start_coordinator()
        svc.start_agent("warm")
        svc.wait_agents(1)
        stub = svc.client_stub()
        job = common_pb2.JobSpec(job_name="d", workflow="d", provider="bash", commands=[CMD])
        lat: list[float] = []
        for i in range(n + 5):
            t0 = time.time()
            run = stub.SubmitRun(client_pb2.SubmitRunRequest(workflow="d", jobs=[job]), metadata=meta()).run
            started = None
            while started is None:
                for resp in stub.StreamLogs(
                    client_pb2.StreamLogsRequest(run_name=run.name, follow=True), metadata=meta()
                ):
                    for jl in resp.jobs:
                        for ln in jl.lines:
                            started = float(ln.text)
            if i >= 5:  # the first few warm the code cache and the connections
                lat.append(started - t0)
        floor: list[float] = []
        for _ in range(50):
            t0 = time.time()
            out = subprocess.run(["bash", "-c", CMD], capture_output=True, text=True).stdout
            floor.append(float(out) - t0)
        print(f"dispatch latency (submit -> process start): {summary_ms(lat)}")
        print(f"baseline: bash spawn alone:                 {summary_ms(floor)}")
    finally:
        svc.stop()


if __name__ == "__main__":
    main()
