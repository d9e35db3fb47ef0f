"""Port tunnels with real processes (docs/tunnels.md): CLI <-> coordinator <-> agent <-> a job's port.

A host job serves HTTP and a raw "hash what you got until EOF" protocol on two declared ports; the
tests reach them through `dstack run`'s printed URL and `dstack port-forward`, and run the attacks: a
member who does not own the run, a viewer, a port the job did not declare (an agent-local service),
and a second agent that names a tunnel it was not asked to open."""

from __future__ import annotations

import hashlib
import json
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from dstack.protos.v1 import agent_pb2_grpc, client_pb2_grpc, common_pb2
from tests.conftest import (
    Cluster,
    LocalMode,
    free_port,
    search,
    sigint_as_from_a_terminal,
    wait_for,
    write_project,
)
from tests.dockerd import Dockerd
from tests.integration.test_docker import docker_agent

pytestmark = pytest.mark.integration

MB = 1 << 20

# The job's server: HTTP on the first port (GET /hello, GET /blob/N: N seeded random bytes, POST /sha256:
# the body's hash), and on the second port a raw protocol: read until the client's EOF, answer the sha256.
SERVE = """
import hashlib, random, socketserver, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Http(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def _send(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path.startswith("/blob/"):
            self._send(random.Random(7).randbytes(int(self.path[6:])))
        else:
            self._send(b"hello from the job")
    def do_POST(self):
        n, h = int(self.headers["Content-Length"]), hashlib.sha256()
        while n:
            chunk = self.rfile.read(min(n, 1 << 20))
            h.update(chunk)
            n -= len(chunk)
        self._send(h.hexdigest().encode())

class HashUntilEof(socketserver.StreamRequestHandler):
    def handle(self):
        h = hashlib.sha256()
        while chunk := self.request.recv(1 << 16):
            h.update(chunk)
        self.request.sendall(h.hexdigest().encode())

socketserver.ThreadingTCPServer.allow_reuse_address = True
raw = socketserver.ThreadingTCPServer(("127.0.0.1", int(sys.argv[2])), HashUntilEof)
threading.Thread(target=raw.serve_forever, daemon=True).start()
ThreadingHTTPServer.allow_reuse_address = True
print("serving", flush=True)
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Http).serve_forever()
"""


def project(tmp: Path, http: int, raw: int, idle: int | None = None) -> Path:
    """`idle`: a port the workflow declares and nothing serves."""
    ports = ", ".join(str(p) for p in (http, raw, idle) if p)
    return write_project(
        tmp / "p",
        f"""
        workflows:
          - name: serve
            provider: bash
            ports: [{ports}]
            commands:
              - python3 serve.py {http} {raw}
        """,
        {"serve.py": SERVE},
    )


@dataclass
class Running:
    """A CLI process whose stderr is collected line by line while it runs."""

    popen: subprocess.Popen[str]
    err: list[str] = field(default_factory=list)
    collector: threading.Thread = field(init=False)

    @classmethod
    def start(cls, cluster: Cluster | LocalMode, *args: str, cwd: Path, token: str | None = None) -> Running:
        # PYTHONFAULTHANDLER: a CLI that does not exit is sent SIGABRT (`exit_code`) and prints every thread's stack
        env = cluster.env() | {"PYTHONFAULTHANDLER": "1"} | ({"DSTACK_TOKEN": token} if token else {})
        popen = subprocess.Popen(
            [sys.executable, "-m", "dstack.cli", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
            preexec_fn=sigint_as_from_a_terminal,  # tests send it SIGINT as a Ctrl-C
        )
        r = cls(popen)
        r.collector.start()
        return r

    def __post_init__(self) -> None:
        self.collector = threading.Thread(target=self._collect, daemon=True)

    def _collect(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.err.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.err)

    def wait_line(self, pattern: str, timeout: float = 90) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            return next((m for line in list(self.err) if (m := re.search(pattern, line))), None)

        return wait_for(found, timeout=timeout, interval=0.1, what=f"{pattern!r} in\n{self.text()}")

    def interrupt(self) -> None:
        """Ctrl-C. A CLI that ignores SIGINT (started with it ignored: `sigint_as_from_a_terminal` is what
        prevents that) would never exit; the test says so at once rather than after a timeout."""
        status = Path(f"/proc/{self.popen.pid}/status").read_text()
        ignored = int(search(r"^SigIgn:\s*([0-9a-f]+)$", status, re.M)[1], 16)
        assert not ignored & (1 << (signal.SIGINT - 1)), "the CLI ignores SIGINT: a Ctrl-C could not reach it"
        self.popen.send_signal(signal.SIGINT)

    def exit_code(self, timeout: float = 30) -> int:
        """The CLI's exit status; one still running after `timeout` is aborted, and the test fails with its
        output, which then ends with every thread's stack (faulthandler): a hang explains itself."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.send_signal(signal.SIGABRT)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
            self.collector.join(10)
            pytest.fail(f"the CLI did not exit within {timeout} s; its stderr:\n{self.text()}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            self.popen.wait(30)


@pytest.fixture
def running() -> Iterator[list[Running]]:
    procs: list[Running] = []
    yield procs
    for p in procs:
        p.stop()


def get(url: str, timeout: float = 60) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body: bytes = r.read()
        return body


def says_hello(url: str) -> bool:
    """Whether the job's server answers through `url` yet (it listens a moment after the job runs)."""
    try:
        return get(url + "hello", timeout=5) == b"hello from the job"
    except OSError:
        return False


def hash_until_eof(port: int, data: bytes) -> str:
    """The raw protocol: send, half-close, read the answer (HTTP/1.0 style request-then-EOF)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(1 << 16):
            answer += chunk
        return answer.decode()


def add_user(cluster: Cluster, name: str, role: str = "member") -> str:
    r = cluster.cli("users", "add", name, "--role", role)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()[1]


def test_run_url_and_port_forward_carry_traffic_until_the_job_ends(
    cluster: Cluster, tmp_path: Path, running: list[Running]
) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    http, raw = free_port(), free_port()
    root = project(tmp_path, http, raw)

    run = Running.start(cluster, "run", "serve", cwd=root)
    running.append(run)
    name = run.wait_line(r"(\S+) submitted").group(1)
    url = run.wait_line(rf"tunnel port {http}: (http://127\.0\.0\.1:\d+/)").group(1)
    raw_local = int(run.wait_line(rf"tunnel port {raw}: http://127\.0\.0\.1:(\d+)/").group(1))
    wait_for(lambda: says_hello(url), timeout=60, what="the job's server")

    # Many connections at once, each its own stream on the one channel.
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda i: get(f"{url}blob/{1000 + i}"), range(20)))
    assert [len(a) for a in answers] == [1000 + i for i in range(20)]
    assert all(a == random.Random(7).randbytes(len(a)) for a in answers)

    # A half-close goes through: the job reads to EOF and still answers.
    small = b"request then EOF"
    assert hash_until_eof(raw_local, small) == hashlib.sha256(small).hexdigest()

    # dstack port-forward: 100 MB each way, intact.
    fwd_port = free_port()
    fwd = Running.start(cluster, "port-forward", name, f"{fwd_port}:{http}", cwd=root)
    running.append(fwd)
    fwd.wait_line(rf"forwarding http://127\.0\.0\.1:{fwd_port}/ to port {http} of run {name}")
    big = 100 * MB
    body = get(f"http://127.0.0.1:{fwd_port}/blob/{big}", timeout=300)
    assert (
        len(body) == big and hashlib.sha256(body).digest() == hashlib.sha256(random.Random(7).randbytes(big)).digest()
    )
    request = urllib.request.Request(f"http://127.0.0.1:{fwd_port}/sha256", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=300) as r:
        assert r.read().decode() == hashlib.sha256(body).hexdigest()

    # The job ends: both CLIs say the tunnels are closed, and the local ports stop answering.
    assert cluster.cli("stop", name).returncode == 0
    fwd.wait_line(rf"run {name} is (stopped|failed): the tunnel is closed")
    assert fwd.exit_code(30) == 0, fwd.text()
    run.wait_line(rf"run {name} is (stopped|failed): the tunnels are closed")
    run.exit_code(30)
    with pytest.raises(OSError):
        get(url + "hello", timeout=5)
    assert "Traceback" not in fwd.text() + run.text()


def _tunnel_call(channel: grpc.Channel, token: str, target: common_pb2.TunnelTarget) -> grpc.RpcError:
    """Opens a tunnel with raw gRPC and returns the error it ends with (it must end with one)."""
    stub = client_pb2_grpc.ClientServiceStub(channel)
    frames = iter([common_pb2.TunnelFrame(open=target), common_pb2.TunnelFrame(data=b"GET / HTTP/1.0\r\n\r\n")])
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Tunnel(frames, metadata=[("authorization", f"Bearer {token}")], timeout=60))
    return e.value


def test_only_the_owner_or_an_admin_reaches_declared_ports_of_a_running_job(
    cluster: Cluster, tmp_path: Path, running: list[Running]
) -> None:
    cluster.start_coordinator()
    cluster.start_agent("agent-1")
    cluster.start_agent("agent-2")
    alice, bob, vera = add_user(cluster, "alice"), add_user(cluster, "bob"), add_user(cluster, "vera", "viewer")
    http, raw, idle = free_port(), free_port(), free_port()
    root = project(tmp_path, http, raw, idle)
    r = subprocess.run(
        [sys.executable, "-m", "dstack.cli", "run", "serve", "-d"],
        capture_output=True,
        text=True,
        env=cluster.env() | {"DSTACK_TOKEN": alice},
        cwd=root,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    name = r.stdout.strip()
    cluster.wait_status(name, {"running"}, timeout=90)

    # An agent-local service the job did not declare: a tunnel must never reach it.
    secret = socket.create_server(("127.0.0.1", 0))
    secret_port = secret.getsockname()[1]

    with cluster.channel() as ch:
        e = _tunnel_call(ch, bob, common_pb2.TunnelTarget(run_name=name, port=http))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"only the owner (alice) or an admin can open a tunnel into run {name}; you are bob" in e.details()
        e = _tunnel_call(ch, vera, common_pb2.TunnelTarget(run_name=name, port=http))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "member role" in e.details(), e.details()
        e = _tunnel_call(ch, alice, common_pb2.TunnelTarget(run_name=name, port=secret_port))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        declared = ", ".join(map(str, sorted([http, raw, idle])))
        assert f"port {secret_port} is not one of the ports run {name} declares ({declared})" in e.details()
        e = _tunnel_call(ch, alice, common_pb2.TunnelTarget(run_name=name, port=idle))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"port {idle} of job serve (run {name}): nothing answers on port {idle} inside the job" in e.details()
        e = _tunnel_call(ch, alice, common_pb2.TunnelTarget(run_name="no-such-run", port=http))
        assert e.code() == grpc.StatusCode.NOT_FOUND

        # A second agent naming a tunnel id it was not given is refused.
        agent2 = json.loads((cluster.tmp / "agent-2" / "agent.json").read_text())
        stub = agent_pb2_grpc.AgentServiceStub(ch)
        with pytest.raises(grpc.RpcError) as forged:
            list(
                stub.Tunnel(
                    iter([common_pb2.TunnelFrame(tunnel_id="A" * 32), common_pb2.TunnelFrame(data=b"x")]),
                    metadata=[("authorization", f"Bearer {agent2['agent_token']}")],
                    timeout=30,
                )
            )
        assert forged.value.code() == grpc.StatusCode.PERMISSION_DENIED, forged.value.details()
        assert "unknown tunnel id" in (forged.value.details() or "")
        # A user's token is no agent's.
        with pytest.raises(grpc.RpcError) as as_user:
            list(
                stub.Tunnel(
                    iter([common_pb2.TunnelFrame(tunnel_id="A" * 32)]),
                    metadata=[("authorization", f"Bearer {alice}")],
                    timeout=30,
                )
            )
        assert as_user.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "needs an agent token" in (as_user.value.details() or "")

    # The CLI says the same before it listens, without a traceback; the owner and an admin get through.
    def pf(token: str, spec: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dstack.cli", "port-forward", name, spec],
            capture_output=True,
            text=True,
            env=cluster.env() | {"DSTACK_TOKEN": token},
            cwd=root,
            timeout=60,
        )

    r = pf(bob, str(http))
    assert r.returncode != 0 and "only the owner (alice) or an admin" in r.stderr and "Traceback" not in r.stderr
    r = pf(alice, str(secret_port))
    assert r.returncode != 0 and f"port {secret_port} is not one of the ports" in r.stderr, r.stderr
    for token in (alice, cluster.admin_token):
        local = free_port()
        fwd = Running.start(cluster, "port-forward", name, f"{local}:{http}", cwd=root, token=token)
        running.append(fwd)
        fwd.wait_line(rf"forwarding http://127\.0\.0\.1:{local}/")
        base = f"http://127.0.0.1:{local}/"
        wait_for(lambda u=base: says_hello(u), timeout=60)  # type: ignore[misc]
        fwd.stop()
    secret.close()

    # dstack attach reopens a tunnel for each port, follows the logs, and says when the run ends.
    attach = Running.start(cluster, "attach", name, cwd=root, token=alice)
    running.append(attach)
    url = attach.wait_line(rf"tunnel port {http}: (http://127\.0\.0\.1:\d+/)").group(1)
    assert get(url + "hello") == b"hello from the job"
    assert cluster.cli("stop", name).returncode == 0
    attach.wait_line(rf"run {name} is (stopped|failed): the tunnels are closed")
    attach.exit_code(30)
    with cluster.channel() as ch:
        e = _tunnel_call(ch, alice, common_pb2.TunnelTarget(run_name=name, port=http))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"job serve of run {name} is " in e.details() and "not running" in e.details(), e.details()
    assert "Traceback" not in attach.text()


def test_local_mode_run_prints_a_url_that_reaches_the_job(
    local: LocalMode, tmp_path: Path, running: list[Running]
) -> None:
    """The embedded coordinator listens on a Unix socket; the job runs on this very host, so the CLI
    must not take the job's port number for itself."""
    http, raw = free_port(), free_port()
    root = project(tmp_path, http, raw)
    run = Running.start(local, "run", "serve", cwd=root)
    running.append(run)
    url = run.wait_line(rf"tunnel port {http}: (http://127\.0\.0\.1:\d+/)", timeout=120).group(1)
    assert f":{http}/" not in url
    wait_for(lambda: says_hello(url), timeout=60, what="the job's server")
    run.interrupt()  # Ctrl-C: the tunnels close, the run goes on (no terminal: no question)
    assert run.exit_code(30) == 130, run.text()
    run.wait_line("the tunnels are closed")
    run.wait_line("detached; the run goes on")
    assert "Traceback" not in run.text()
    with pytest.raises(OSError):
        get(url + "hello", timeout=5)


def test_a_container_job_is_reached_on_its_port(
    cluster: Cluster, dockerd: Dockerd, tmp_path: Path, running: list[Running]
) -> None:
    """The Docker runtime: the agent dials the port the container serves (the tests' engine has no
    bridge, so the container shares the host's network; a bridge publishes the port on the host)."""
    cluster.start_coordinator()
    docker_agent(cluster, dockerd, "agent-1", "--docker-network", "host")
    port = free_port()
    root = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: web
            provider: bash
            ports: [{port}]
            commands:
              - mkdir -p www && echo -n hello from the job > www/hello
              - httpd -f -p 127.0.0.1:{port} -h www
        """,
    )
    r = cluster.cli("run", "web", "-d", cwd=root)
    assert r.returncode == 0, r.stderr
    name = r.stdout.strip()
    cluster.wait_status(name, {"running"}, timeout=90)
    local = free_port()
    fwd = Running.start(cluster, "port-forward", name, f"{local}:{port}", cwd=root)
    running.append(fwd)
    fwd.wait_line(rf"forwarding http://127\.0\.0\.1:{local}/")
    wait_for(lambda: says_hello(f"http://127.0.0.1:{local}/"), timeout=60, what="httpd in the container")
    assert dockerd.containers(cluster.tmp / "agent-1"), "the job runs in a container"
    assert cluster.cli("stop", name).returncode == 0
    fwd.wait_line(rf"run {name} is (stopped|failed): the tunnel is closed")


def test_ports_n_picked_by_the_agent_are_reached_through_run_and_attach(
    cluster: Cluster, tmp_path: Path, running: list[Running]
) -> None:
    """`ports: 1` (2022): the agent picks the port when the job starts; `dstack run` learns it from the
    job's record and opens the tunnel then, and the coordinator and agent let the tunnel reach it."""
    cluster.start_coordinator()
    cluster.start_agent()
    root = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: web
            provider: bash
            ports: 1
            commands:
              - mkdir -p www && echo -n hello from the job > www/hello
              - python3 -m http.server --bind 127.0.0.1 --directory www $PORT_0
        """,
    )
    run = Running.start(cluster, "run", "web", cwd=root)
    running.append(run)
    m = run.wait_line(r"tunnel port (\d+): (http://127\.0\.0\.1:\d+/)", timeout=120)
    picked, url = int(m.group(1)), m.group(2)
    wait_for(lambda: says_hello(url), timeout=60, what="the job's server on its picked port")
    name = wait_for(lambda: next((r["name"] for r in cluster.runs() if r["status"] == "running"), None))
    jobs = cluster.run_info(name)["jobs"]
    assert [p["container"] for p in jobs[0]["ports"]] == [picked], jobs
    attach = Running.start(cluster, "attach", name, cwd=root)
    running.append(attach)
    again = attach.wait_line(rf"tunnel port {picked}: (http://127\.0\.0\.1:\d+/)").group(1)
    wait_for(lambda: says_hello(again), timeout=60, what="the picked port through attach")
    assert cluster.cli("stop", name).returncode == 0
    attach.wait_line(rf"run {name} is (stopped|failed): the tunnels are closed")
    assert "Traceback" not in run.text() + attach.text()
