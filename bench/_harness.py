"""Shared by the benchmarks: start a coordinator (and agents) as real processes on loopback."""

from __future__ import annotations

import os
import shutil
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
from dstack.tls import SERVER_NAME

REPO = Path(__file__).resolve().parent.parent
ADMIN = "bench-admin"
JOIN = "bench-join"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


STARTUP_S = 120.0  # how long a coordinator may take to answer after its start


class Services:
    """A coordinator and agents over TLS with the coordinator's own CA, as a team runs them (tls=False:
    plaintext, `--insecure` on both sides, to measure what TLS costs)."""

    def __init__(self, tls: bool = True, tree: Path = REPO, keep: bool = False) -> None:
        self.tls = tls
        # Keep the folder (logs, state) after `stop`; DSTACK_BENCH_KEEP=1 keeps every bench's.
        self.keep = keep or os.environ.get("DSTACK_BENCH_KEEP") == "1"
        # The source tree the processes run (bench.logs --tree: another commit's checkout, side by side).
        self.tree = tree
        self.tmp = Path(tempfile.mkdtemp(prefix="dstack-bench-"))
        # As root an agent runs host jobs as its job user, who must pass through to <home>-jobs.
        self.tmp.chmod(0o711)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}  # pid -> the log of a process started here (shown if it exits early)
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.coordinator_module = "dstack.coordinator"  # bench.memprobe: the same, with a memory sampler
        # What the processes run before their module (bench.logs --trace: ["-m", "bench.logtrace", ROLE]).
        self.coordinator_wrap: list[str] = []
        self.agent_wrap: list[str] = []
        self.env: dict[str, str] = {}  # extra environment of every process started
        # bench.drain: the coordinator alone from another source tree, with extra environment of its own
        # (bench.profiled's PROFILE_OUT).
        self.coordinator_tree: Path | None = None
        self.coordinator_env: dict[str, str] = {}

    def _env(self, **extra: str) -> dict[str, str]:
        # The tree first on the path: a process started elsewhere (the CLI, in tmp) imports it too.
        path = os.pathsep.join([str(self.tree), *filter(None, [os.environ.get("PYTHONPATH")])])
        return {**os.environ, "PYTHONPATH": path, **self.env, **extra}

    def start_coordinator(self, *extra: str) -> None:
        previous = self.coordinator
        if previous is not None and previous.poll() is not None:
            # Killed or stopped on purpose before this restart: its exit is no failure of the new one.
            self.procs.remove(previous)
        log = open(self.tmp / "coordinator.log", "ab")
        env = self._env(DSTACK_ADMIN_TOKEN=ADMIN, DSTACK_JOIN_TOKEN=JOIN, DSTACK_LOG_LEVEL="WARNING")
        if self.coordinator_tree is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                [str(self.coordinator_tree), *filter(None, [os.environ.get("PYTHONPATH")])]
            )
        env.update(self.coordinator_env)
        self.coordinator = subprocess.Popen(
            [
                sys.executable,
                *self.coordinator_wrap,
                *([] if self.coordinator_wrap else ["-m"]),
                self.coordinator_module,
                "--state-dir",
                str(self.tmp / "server"),
                "--listen",
                self.address,
                # The benches submit thousands of runs as one user: the per-user limits would measure themselves.
                "--max-queued-per-user",
                "0",
                "--max-submissions-per-minute",
                "0",
                *([] if self.tls else ["--insecure"]),
                *extra,
            ],
            stdout=log,
            stderr=log,
            env=env,
            cwd=self.coordinator_tree or self.tree,
        )
        self.procs.append(self.coordinator)
        self.logs[self.coordinator.pid] = self.tmp / "coordinator.log"
        # Starting takes seconds of imports: over 20 s on the shared 2-core machine at load 60.
        deadline = time.monotonic() + STARTUP_S
        while self.tls and not self.ca_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        stub = self.client_stub()
        deadline = time.monotonic() + STARTUP_S
        while True:
            try:
                stub.GetInfo(client_pb2.GetInfoRequest(), metadata=meta(), timeout=1)
                return
            except grpc.RpcError:
                self.check_alive()  # a coordinator that exited (a bad option, a taken port) will never answer
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def start_agent(self, name: str, *extra: str) -> None:
        log = open(self.tmp / f"{name}.log", "ab")
        env = self._env(DSTACK_LOG_LEVEL="WARNING", DSTACK_JOIN_TOKEN=JOIN)
        self.procs.append(
            agent := subprocess.Popen(
                [
                    sys.executable,
                    *self.agent_wrap,
                    *([] if self.agent_wrap else ["-m"]),
                    "dstack.agent",
                    "--coordinator",
                    self.address,
                    "--home",
                    str(self.tmp / name),
                    "--name",
                    name,
                    *(["--ca-file", str(self.ca_file)] if self.tls else ["--insecure"]),
                    *extra,
                ],
                stdout=log,
                stderr=log,
                env=env,
                cwd=self.tree,
            )
        )
        self.logs[agent.pid] = self.tmp / f"{name}.log"

    def check_alive(self) -> None:
        """Raises, with the end of its log, if a process started here has exited: waiting for it is futile."""
        for p in self.procs:
            if p.poll() is not None:
                log = self.logs.get(p.pid)
                tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
                what = log.stem if log is not None else "a process"  # coordinator, or the agent's name
                raise RuntimeError(f"{what} (pid {p.pid}) exited with {p.returncode}:\n{tail}")

    def wait_agents(self, n: int, timeout: float = STARTUP_S) -> None:
        """Until `n` agents are online. An agent's start is seconds of imports and its hello, over 30 s each
        at load 60 on the shared 2-core machine: the bound is generous, and a process that exited ends the
        wait at once."""
        self.check_alive()
        stub = self.client_stub()
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            agents = stub.ListAgents(client_pb2.ListAgentsRequest(), metadata=meta(), timeout=30).agents
            online = sum(a.status == "online" for a in agents)
            if online >= n:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{online} of {n} agents came online in {timeout:.0f}s")
            time.sleep(0.05)

    @property
    def ca_file(self) -> Path:
        return self.tmp / "server" / "tls" / "ca.pem"

    def _tls(self) -> tuple[grpc.ChannelCredentials, list[tuple[str, str]]]:
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca_file.read_bytes())
        return creds, [("grpc.ssl_target_name_override", SERVER_NAME)]

    def channel(self) -> grpc.Channel:
        if not self.tls:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, *self._tls())

    def aio_channel(self) -> grpc.aio.Channel:
        if not self.tls:
            return grpc.aio.insecure_channel(self.address)
        return grpc.aio.secure_channel(self.address, *self._tls())

    def cli_env(self) -> dict[str, str]:
        """What a CLI needs to talk to this coordinator."""
        tls = {"DSTACK_CA_FILE": str(self.ca_file)} if self.tls else {"DSTACK_INSECURE": "1"}
        return {"DSTACK_COORDINATOR": self.address, "DSTACK_TOKEN": ADMIN, **tls}

    def client_stub(self) -> client_pb2_grpc.ClientServiceStub:
        return client_pb2_grpc.ClientServiceStub(self.channel())

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
                p.wait()
        if not self.keep:  # thousands of them piled up in /tmp over a session of benches
            shutil.rmtree(self.tmp, ignore_errors=True)


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
