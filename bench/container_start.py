"""Container start overhead: submit -> the job's first log line reaches the client, Docker vs host runtime.

Two coordinators, each with one warm agent: one runs jobs as host processes, the other in Docker
containers (busybox image, no network). Submissions alternate between them, so both see the same
machine noise. The job is `echo first`; the time is from just before SubmitRun to the moment the
client's StreamLogs yields that line. Also measured: the engine alone (SDK create, attach, start,
first line), the floor of any Docker runtime. The Docker engine: DOCKER_HOST if one answers there, else the
tests' own dockerd (started here, as in tests/dockerd.py; needs root and `apt-get install docker.io
busybox-static`).
Usage: python -m bench.container_start [N]
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench._harness import Services, meta, pct, summary_ms
from dstack.protos.v1 import client_pb2, client_pb2_grpc, common_pb2


def first_line_latency(stub: client_pb2_grpc.ClientServiceStub) -> float:
    job = common_pb2.JobSpec(job_name="c", workflow="c", provider="bash", commands=["echo first"])
    t0 = time.monotonic()
    run = stub.SubmitRun(client_pb2.SubmitRunRequest(workflow="c", jobs=[job]), metadata=meta()).run
    while True:
        for resp in stub.StreamLogs(client_pb2.StreamLogsRequest(run_name=run.name, follow=True), metadata=meta()):
            for jl in resp.jobs:
                for ln in jl.lines:
                    if ln.text == "first":
                        return time.monotonic() - t0
                    if ln.stream == common_pb2.LOG_STREAM_SYSTEM and "could not start" in ln.text:
                        raise RuntimeError(ln.text)


def engine_floor(docker_host: str, image: str, n: int) -> list[float]:
    """The engine's own share: create, attach, start a container and read its first line, then remove it."""
    from dstack.agent.runtimes.docker import make_client

    client = make_client(docker_host)
    stream_client = make_client(docker_host, timeout=None)
    out = []
    try:
        for _ in range(n):
            t0 = time.monotonic()
            c = client.containers.create(image, ["echo", "first"], network_mode="none", init=True)
            stream = stream_client.api.attach(str(c.id), stdout=True, stderr=True, stream=True, demux=True)
            c.start()
            next(iter(stream))
            out.append(time.monotonic() - t0)
            c.remove(force=True)
    finally:
        client.close()
        stream_client.close()
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    from dstack.agent.runtimes.docker import engine_version
    from tests.dockerd import BUSYBOX, Dockerd

    own: Dockerd | None = None
    docker_host = os.environ.get("DOCKER_HOST", "")
    if engine_version(docker_host) is None:
        own = Dockerd(Path(tempfile.mkdtemp(prefix="dstack-bench-dockerd-", dir="/tmp")))
        own.start()
        docker_host = own.host
    engine = engine_version(docker_host)
    if own is not None:
        own.load_images()
    host, boxed = Services(), Services()
    try:
        host.start_coordinator()
        host.start_agent("host", "--runtime", "host")
        boxed.start_coordinator()
        boxed.start_agent(
            "docker",
            "--runtime",
            "docker",
            "--docker-host",
            docker_host,
            "--docker-image-bash",
            BUSYBOX,
            "--docker-network",
            "none",
        )
        host.wait_agents(1)
        boxed.wait_agents(1)
        hs, ds = host.client_stub(), boxed.client_stub()
        for _ in range(3):  # warm the code caches, connections and the image's page cache
            first_line_latency(hs)
            first_line_latency(ds)
        h: list[float] = []
        d: list[float] = []
        for _ in range(n):
            h.append(first_line_latency(hs))
            d.append(first_line_latency(ds))
        floor = engine_floor(docker_host, BUSYBOX, n)
        print(f"Docker engine {engine}; {os.cpu_count()} CPUs; {n} jobs each, alternating")
        print(f"host runtime   submit -> first log line: {summary_ms(h)}")
        print(f"docker runtime submit -> first log line: {summary_ms(d)}")
        print(f"engine alone: create+attach+start -> first line: {summary_ms(floor)}")
        print(
            f"container overhead: +{(pct(d, 50) - pct(h, 50)) * 1e3:.0f} ms at the median"
            f" ({statistics.median(d) / statistics.median(h):.1f}x the host runtime)"
        )
    finally:
        host.stop()
        boxed.stop()
        if own is not None:
            own.stop()
            shutil.rmtree(own.root, ignore_errors=True)


if __name__ == "__main__":
    main()
