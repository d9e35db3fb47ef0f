"""Shared by the benchmarks: start a coordinator (and agents) as real processes on loopback."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil

from dstack.protos.v1 import client_pb2, client_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
ADMIN = "bench-admin"
JOIN = "bench-join"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Services:
    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="dstack-bench-"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.coordinator: subprocess.Popen[bytes] | None = None

    def start_coordinator(self, *extra: str) -> None:
        log = open(self.tmp / "coordinator.log", "ab")
        env = {**os.environ, "DSTACK_ADMIN_TOKEN": ADMIN, "DSTACK_JOIN_TOKEN": JOIN, "DSTACK_LOG_LEVEL": "WARNING"}
        self.coordinator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dstack.coordinator",
                "--state-dir",
                str(self.tmp / "server"),
                "--listen",
                self.address,
                # The benches submit thousands of runs as one user: the per-user limits would measure themselves.
                "--max-queued-per-user",
                "0",
                "--max-submissions-per-minute",
                "0",
                *extra,
            ],
            stdout=log,
            stderr=log,
            env=env,
            cwd=REPO,
        )
        self.procs.append(self.coordinator)
        stub = self.client_stub()
        deadline = time.monotonic() + 20
        while True:
            try:
                stub.GetInfo(client_pb2.GetInfoRequest(), metadata=meta(), timeout=1)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def start_agent(self, name: str, *extra: str) -> None:
        log = open(self.tmp / f"{name}.log", "ab")
        env = {**os.environ, "DSTACK_LOG_LEVEL": "WARNING", "DSTACK_JOIN_TOKEN": JOIN}
        self.procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dstack.agent",
                    "--coordinator",
                    self.address,
                    "--home",
                    str(self.tmp / name),
                    "--name",
                    name,
                    *extra,
                ],
                stdout=log,
                stderr=log,
                env=env,
                cwd=REPO,
            )
        )

    def wait_agents(self, n: int) -> None:
        stub = self.client_stub()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            agents = stub.ListAgents(client_pb2.ListAgentsRequest(), metadata=meta()).agents
            if sum(a.status == "online" for a in agents) >= n:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{n} agents did not come online")

    def client_stub(self) -> client_pb2_grpc.ClientServiceStub:
        return client_pb2_grpc.ClientServiceStub(grpc.insecure_channel(self.address))

    def coordinator_rss_mib(self) -> float:
        assert self.coordinator is not None
        return psutil.Process(self.coordinator.pid).memory_info().rss / (1 << 20)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def meta() -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {ADMIN}")]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def summary_ms(values: list[float]) -> str:
    return (
        f"p50 {pct(values, 50) * 1e3:.1f} ms, p99 {pct(values, 99) * 1e3:.1f} ms, "
        f"mean {statistics.mean(values) * 1e3:.1f} ms (n={len(values)})"
    )
