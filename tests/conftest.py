"""Test harness: real coordinator and agent processes on loopback, driven through the real CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict, TypeVar, cast

import grpc
import pytest
from hypothesis import settings

from dstack.storage.devserver import SeaweedServer
from tests.bytecode import compile_checkout
from tests.cleanup import DOCKERD_PREFIX, kill_agent_leftovers, remove_agent_cgroups, stale_dockerd_roots
from tests.dockerd import Dockerd, DockerUnavailable

# Property tests run on busy CI machines: a per-example time limit only measures the machine's load.
settings.register_profile("dstack", deadline=None)
settings.load_profile("dstack")

if TYPE_CHECKING:
    from dstack.cli.client import Client

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

# Every process a test starts (`python -P -m dstack.agent`, the `dstack` script) imports `dstack` from this
# checkout, not from wherever the venv's editable install points (a git worktree has its own code).
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
# ... and reads its modules' bytecode instead of compiling them again in each process (tests/bytecode.py).
compile_checkout(REPO)


def sigint_as_from_a_terminal() -> None:
    """A `preexec_fn` for a CLI a test interrupts with SIGINT: its default disposition, as a terminal's Ctrl-C
    meets it. A suite started in the background by a script (`cmd &`, `nohup`) inherits SIGINT ignored, and a
    Python started so never raises KeyboardInterrupt: the CLI would go on as if no signal came."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


T = TypeVar("T")
# How long the cluster fixture waits for a coordinator or an agent it started to answer. Their starts are
# seconds of imports: over 20 s each at load 60+ on the shared 2-core machine, where the old 20 s bound
# failed tests that would have passed. Generous, as a process that exited fails the wait at once.
START_TIMEOUT_S = 120.0


def wait_for(predicate: Callable[[], T | None], timeout: float = 20.0, interval: float = 0.05, what: str = "") -> T:
    """Polls `predicate` until it returns a truthy value, and returns that value."""
    deadline = time.monotonic() + timeout
    while True:
        started = time.monotonic()
        value = predicate()
        if value:
            return value
        now = time.monotonic()
        if now > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        # A predicate that starts a process (a CLI call: ~0.15 CPU-seconds) would otherwise poll back to back
        # and take a whole core from the processes the test waits on; resting as long as it ran (up to 0.5 s) caps
        # polling near half of one core, and a cheap predicate still polls every `interval`.
        time.sleep(max(interval, min(now - started, 0.5)))


def search(pattern: str, text: str, flags: int = 0) -> re.Match[str]:
    """`re.search` for text the test expects to match: no match fails the test, showing the text."""
    m = re.search(pattern, text, flags)
    if m is None:
        raise AssertionError(f"no match for {pattern!r} in {text!r}")
    return m


# What `dstack ps --json` and `dstack agents --json` print (cli/render.py, cli/commands/agents.py).
class CodeJSON(TypedDict):
    hash: str
    commit: str | None
    branch: str | None
    repo_url: str | None
    dirty: bool


class JobJSON(TypedDict):
    id: str
    name: str
    status: str
    termination_reason: str | None
    message: str | None
    agent: str | None
    gpus: list[int]
    exit_code: int | None
    queue_position: int | None  # while waiting: the position in the scheduler's order
    wait_reason: str | None  # fair-share, quota, reservation, resources, never-fits, dependencies
    eta: str | None  # expected start (ISO 8601), when known
    attempt: int  # 1 unless retried or preempted
    attempts: list[AttemptJSON]  # the earlier attempts, oldest first
    ports: list[PortJSON]  # what `ports:` resolved to on the job's agent (reported when it started)


class PortJSON(TypedDict):
    container: int
    host: int


class AttemptJSON(TypedDict):
    attempt: int
    agent: str | None
    status: str
    termination_reason: str | None
    message: str | None
    started_at: str | None
    finished_at: str | None


class RunJSON(TypedDict):
    name: str
    workflow: str
    repository: str
    owner: str
    status: str
    termination_reason: str | None
    message: str | None
    submitted_at: str | None
    finished_at: str | None
    tags: list[str]
    code: CodeJSON
    jobs: list[JobJSON]


class ArtifactJSON(TypedDict):  # `dstack artifacts list --json` (cli/commands/artifacts.py)
    job: str
    path: str
    size: int
    sha256: str


class GpuJSON(TypedDict):
    index: int
    name: str
    uuid: str
    memory_bytes: int
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_percent: int
    temperature_c: int
    busy: bool
    simulated: bool


class AgentJSON(TypedDict):
    name: str
    host: str
    address: str  # where other agents reach it (`dstack agent --advertise-address`)
    status: str
    runtime: str
    cpu: int
    memory_bytes: int
    memory_available_bytes: int
    running_jobs: int
    disk_free_bytes: int
    min_free_disk_bytes: int
    work_dir: str
    draining: str  # "disk full" while its disk is below --min-free-disk, else ""
    gpus_free: int
    gpus: list[GpuJSON]


def write_project(root: Path, workflows: str, files: dict[str, str] | None = None) -> Path:
    (root / ".dstack").mkdir(parents=True, exist_ok=True)
    (root / ".dstack" / "workflows.yaml").write_text(textwrap.dedent(workflows))
    for name, text in (files or {}).items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return root


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path

    def kill9(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Cluster:
    """A coordinator on 127.0.0.1 plus agents, with a CLI environment pointing at it."""

    tmp: Path
    port: int
    lease_timeout: float = 3.0
    heartbeat: float = 0.5
    # Self-fencing (docs/lifecycle.md), off unless a test turns it on (tests/integration/test_self_fence.py):
    # with a 3 s lease an agent would stop its jobs whenever acks come 5 s late, which a log flood on this
    # busy machine does (the coordinator handles a stream's messages in order, its heartbeats behind
    # its log batches). On: a lost agent's jobs are requeued lease + margin after its last message, and
    # the agent stops them `fence_kill` before (a SIGKILL of a process group takes milliseconds).
    self_fence: str = "off"
    fence_margin: float = 3.0
    fence_kill: float = 1.0
    coordinator: Proc | None = None
    agents: list[Proc] = field(default_factory=list)
    admin_token: str = "test-admin-token"
    join_token: str = "test-join-token"
    # Only the coordinator gets these (e.g. S3 credentials): CLIs and agents must do without.
    coordinator_env: dict[str, str] = field(default_factory=dict)
    # TLS with the coordinator's own CA, as in a team setup; False: everything plaintext (--insecure).
    tls: bool = True
    # Where the coordinator listens (tests/netns.py: the host's address on a bed of namespaces).
    host: str = "127.0.0.1"
    # What `start_coordinator` runs with `python -m` (tests/old_coordinator.py: one without SubmitRuns).
    coordinator_module: str = "dstack.coordinator"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ca_file(self) -> Path:
        """The CA the coordinator makes on first start (clients pin it)."""
        return self.tmp / "server" / "tls" / "ca.pem"

    def channel(self, options: list[tuple[str, int]] | None = None) -> grpc.Channel:
        """A raw gRPC channel to the coordinator, as an agent or a hand-written client opens one.

        Tests that speak gRPC directly open it here, so that they follow the cluster's transport."""
        if not self.tls:
            return grpc.insecure_channel(self.address, options=options or [])
        from dstack.tls import SERVER_NAME

        creds = grpc.ssl_channel_credentials(root_certificates=self.ca_file.read_bytes())
        tls_options: list[tuple[str, str | int]] = [("grpc.ssl_target_name_override", SERVER_NAME)]
        return grpc.secure_channel(self.address, creds, options=[*(options or []), *tls_options])

    def transport_args(self) -> list[str]:
        """The options of `dstack agent` and `dstack config` for the cluster's transport."""
        return ["--ca-file", str(self.ca_file)] if self.tls else ["--insecure"]

    def start_coordinator(self, *extra: str) -> Proc:
        log = self.tmp / "coordinator.log"
        f = log.open("ab")
        popen = subprocess.Popen(
            [
                PY,
                "-m",
                self.coordinator_module,
                "--state-dir",
                str(self.tmp / "server"),
                "--listen",
                self.address,
                "--lease-timeout",
                str(self.lease_timeout),
                "--heartbeat-interval",
                str(self.heartbeat),
                "--self-fence",
                self.self_fence,
                "--fence-margin",
                str(self.fence_margin),
                "--fence-kill-time",
                str(self.fence_kill),
                *([] if self.tls else ["--insecure"]),
                *extra,
            ],
            stdout=f,
            stderr=f,
            env={
                **_without_aws(os.environ),
                "DSTACK_ADMIN_TOKEN": self.admin_token,
                "DSTACK_JOIN_TOKEN": self.join_token,
                **self.coordinator_env,
            },
            cwd=REPO,
        )
        f.close()
        coordinator = self.coordinator = Proc(popen, log)
        wait_for(lambda: self._answers(coordinator), timeout=START_TIMEOUT_S, what="the coordinator to answer")
        return coordinator

    def client(self) -> Client:
        """An in-process client of the coordinator, as the CLI makes it from `env()` (same address, token and
        CA). The harness waits through it: polling with a CLI process costs ~0.15 CPU-seconds a call, which
        on a busy machine slowed the very processes a test waits on. Tests check through `cli()`."""
        verbosity = os.environ.get("GRPC_VERBOSITY")
        from dstack.cli.client import Client  # sets GRPC_VERBOSITY for the CLI: not for the processes we start
        from dstack.cli.home import Endpoint, truthy

        if verbosity is None:
            os.environ.pop("GRPC_VERBOSITY", None)
        env = self.env()
        endpoint = Endpoint(
            env["DSTACK_COORDINATOR"],
            env.get("DSTACK_TOKEN", ""),
            ca_file=env.get("DSTACK_CA_FILE", ""),
            insecure=truthy(env.get("DSTACK_INSECURE")),
        )
        return Client(endpoint, timeout=10)

    def _answers(self, coordinator: Proc) -> bool:
        """Whether the coordinator answers `dstack ps` (ListRuns with the admin token); fails at once if it
        exited, with its log, instead of polling until the timeout."""
        if coordinator.popen.poll() is not None:
            raise AssertionError(f"the coordinator exited with {coordinator.popen.returncode}:\n{coordinator.output()}")
        if self.tls and not self.ca_file.exists():
            return False
        from dstack.cli.errors import CliError

        try:
            with closing(self.client()) as client:
                client.list_runs(False)
        except CliError:
            return False
        return True

    def start_agent(self, name: str = "agent-1", *extra: str, wait: bool = True, prefix: Sequence[str] = ()) -> Proc:
        """`prefix`: what runs the agent (tests/netns.py: `ip netns exec NS`, inside a namespace)."""
        log = self.tmp / f"{name}.log"
        f = log.open("ab")
        popen = subprocess.Popen(
            [
                *prefix,
                PY,
                "-m",
                "dstack.agent",
                "--coordinator",
                self.address,
                "--home",
                str(self.tmp / name),
                "--name",
                name,
                "--stop-grace",
                "2",
                *([] if "--runtime" in extra else ["--runtime", "host"]),  # not `auto`: a dev box may run Docker
                *([] if {"--ca-file", "--ca-fingerprint", "--insecure"} & set(extra) else self.transport_args()),
                # Jobs as the agent's user unless a test names a job user (tests/integration/test_agent_scope.py).
                *([] if "--job-user" in extra else ["--job-user", "none"]),
                *extra,
            ],
            stdout=f,
            stderr=f,
            # From the environment, as README.md says: a token in argv is visible to every user of the host.
            env={**_without_aws(os.environ), "DSTACK_JOIN_TOKEN": self.join_token},
            cwd=REPO,
        )
        f.close()
        proc = Proc(popen, log)
        self.agents.append(proc)
        if not wait:
            return proc
        wait_for(lambda: self._online(name, proc), timeout=START_TIMEOUT_S, what=f"agent {name} online")
        return proc

    def _online(self, name: str, proc: Proc | None = None) -> bool:
        """Whether the pool lists agent `name` online (what `dstack agents --json` shows), asked in-process;
        fails at once if its process `proc` exited."""
        from dstack.cli.errors import CliError

        if proc is not None and proc.popen.poll() is not None:
            raise AssertionError(f"agent {name} exited with {proc.popen.returncode}:\n{proc.output()}")
        try:
            with closing(self.client()) as client:
                return any(a.name == name and a.status == "online" for a in client.list_agents())
        except CliError:
            return False

    def env(self) -> dict[str, str]:
        return {
            **_without_aws(os.environ),
            "DSTACK_HOME": str(self.tmp / "cli-home"),
            "DSTACK_COORDINATOR": self.address,
            "DSTACK_TOKEN": self.admin_token,
            **({"DSTACK_CA_FILE": str(self.ca_file)} if self.tls else {"DSTACK_INSECURE": "1"}),
        }

    def cli(self, *args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PY, "-m", "dstack.cli", *args],
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=cwd or self.tmp,
            timeout=timeout,
        )

    def agents_json(self) -> list[AgentJSON]:
        r = self.cli("agents", "--json")
        agents: list[AgentJSON] = json.loads(r.stdout) if r.returncode == 0 else []
        return agents

    def runs(self) -> list[RunJSON]:
        r = self.cli("ps", "-a", "--json")
        assert r.returncode == 0, r.stderr
        runs: list[RunJSON] = json.loads(r.stdout)
        return runs

    def run_info(self, name: str) -> RunJSON:
        return next(r for r in self.runs() if r["name"] == name)

    def wait_status(self, name: str, statuses: set[str], timeout: float = 60) -> RunJSON:
        """Waits until run `name` has one of `statuses`, and returns it as `dstack ps -a --json` prints it
        (the same rendering, cli/render.py run_to_json), polling in-process rather than with a CLI process."""
        from dstack.cli.render import run_to_json

        def matching() -> RunJSON | None:
            with closing(self.client()) as client:
                found = cast(RunJSON, run_to_json(client.get_run(name)))  # the message ListRuns sends for it
            return found if found["status"] in statuses else None

        return wait_for(matching, timeout=timeout, interval=0.2, what=f"run {name} to be {statuses}")

    def stop_all(self) -> None:
        for a in self.agents:
            a.terminate()
        if self.coordinator is not None:
            self.coordinator.terminate()


def _without_aws(env: os._Environ[str] | dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith("AWS_")}


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A real S3 server (SeaweedFS) shared by the session; tests keep apart by key prefix."""
    yield from _running(SeaweedServer(tmp_path_factory.mktemp("seaweed")))


@pytest.fixture
def own_seaweed(tmp_path: Path) -> Iterator[SeaweedServer]:
    """A server of the test's own, for tests that kill it."""
    yield from _running(SeaweedServer(tmp_path / "seaweed"))


def _running(server: SeaweedServer) -> Iterator[SeaweedServer]:
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, free_port())
    try:
        yield c
    finally:
        c.stop_all()
        _remove_killed_agents_jobs(tmp_path)


def _remove_killed_agents_jobs(homes_under: Path) -> None:
    """What the jobs of agents killed with SIGKILL left (tests/cleanup.py): their processes, which would run
    on (a `sleep 600`) and hold their cgroups, then the groups."""
    kill_agent_leftovers(homes_under)
    if os.geteuid() == 0:
        remove_agent_cgroups(homes_under)


@dataclass
class LocalMode:
    home: Path
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. DSTACK_RUNTIME, DSTACK_STORAGE

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DSTACK_", "AWS_"))}
        env["DSTACK_HOME"] = str(self.home)
        env["DSTACK_RUNTIME"] = "host"  # not `auto`: a dev box may run Docker
        return env | self.extra_env

    def cli(self, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PY, "-m", "dstack.cli", *args], capture_output=True, text=True, env=self.env(), cwd=cwd, timeout=timeout
        )


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalMode]:
    lm = LocalMode(tmp_path / "dstack-home")
    try:
        yield lm
    finally:
        subprocess.run([PY, "-m", "dstack.cli", "local", "stop"], env=lm.env(), capture_output=True, timeout=60)


@pytest.fixture(scope="session", autouse=True)
def agent_cgroups_removed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At the session's end, what its agents that were killed left (SIGKILL leaves their jobs and cgroups;
    tests/cleanup.py), from tests without the `cluster` fixture."""
    yield
    _remove_killed_agents_jobs(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    """The tests' own Docker engine (see tests/dockerd.py). Missing Docker fails under CI=true, else skips."""
    for stale in stale_dockerd_roots():  # engines of sessions killed before their teardown (tests/cleanup.py)
        Dockerd(stale).remove()
    # A short path: the engine's socket must fit in AF_UNIX's 108 bytes.
    root = Path(tempfile.mkdtemp(prefix=DOCKERD_PREFIX, dir="/tmp"))
    d = Dockerd(root)
    try:
        d.start()
        d.load_images()
    except DockerUnavailable as e:
        d.remove()
        if os.environ.get("CI") == "true":
            pytest.fail(f"Docker is required under CI: {e}")
        pytest.skip(f"no Docker engine for the tests: {e}")
    try:
        yield d
    finally:
        left = d.remove()
        assert not left, f"the tests' dockerd left mounts behind: {left}"
