"""The embedded default: a local coordinator and one local agent, started on first use and reused.

They are the same programs as the team setup (`python -m dstack.coordinator`, `python -m dstack.agent`), bound
only to a Unix socket, with all state under $DSTACK_HOME/local.
"""

from __future__ import annotations

# hashlib, secrets and tempfile are imported where they are used: every command in local mode comes through
# ensure_running, and it needs none of them once the services run (~3 ms of the CLI's start).
import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dstack.cli.errors import CliError
from dstack.cli.home import Endpoint, dstack_home

if TYPE_CHECKING:
    from dstack.cli.client import Client

START_TIMEOUT_S = 20.0
TAIL_LINES = 15
LOCAL_AGENT = "local"


class LocalServicesError(CliError):
    def __init__(self, message: str, started: Started | None = None) -> None:
        if started is not None:
            tail = started.tail()
            message += f"; the end of {started.log}:\n{tail}" if tail else f"; its log is {started.log}"
        super().__init__(message)


def local_dir() -> Path:
    return dstack_home() / "local"


def _private_local_dir() -> Path:
    """local_dir(), made 0700 (or tightened to it): it holds the local admin and join tokens and the state."""
    d = local_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    if d.stat().st_mode & 0o077:
        os.chmod(d, 0o700)
    return d


def socket_path() -> Path:
    sock = local_dir() / "coordinator.sock"
    if len(str(sock)) > 100:  # AF_UNIX paths are limited to 108 bytes
        import hashlib
        import tempfile

        digest = hashlib.sha256(str(sock).encode()).hexdigest()[:16]
        sock = Path(tempfile.gettempdir()) / f"dstack-{os.getuid()}-{digest}.sock"
    return sock


def _secret(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    import secrets

    _private_local_dir()  # where every secret of local mode lives
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    with open(_private_local_dir() / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # two CLIs starting at once start one coordinator
        yield


def _alive(pid_file: Path, module: str) -> int | None:
    """The pid in pid_file if that process is alive and is `python -m dstack.MODULE` (not a reused pid)."""
    try:
        pid = int(pid_file.read_text())
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if f"dstack.{module}".encode() in cmd else None


@dataclass
class Started:
    """A local service this CLI has just started: its process and where its log for this start begins."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    log_offset: int
    started_ns: int

    def failure(self) -> LocalServicesError | None:
        """An error with the end of its log if the process has exited, else None."""
        code = self.proc.poll()
        if code is None:
            return None
        return LocalServicesError(f"the local {self.name} exited (code {code}) as it started", self)

    def tail(self, lines: int = TAIL_LINES) -> str:
        try:
            with self.log.open("rb") as f:
                f.seek(self.log_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _spawn(name: str, args: list[str], env: dict[str, str]) -> Started:
    d = local_dir()
    log_path = d / f"{name}.log"
    with open(log_path, "ab") as log:
        offset = log.tell()
        proc = subprocess.Popen(
            # -P: the working directory is not put on sys.path, so no folder named like one of our packages
            # (the agent's own state folder `agent/` sits in this directory) can shadow it.
            [sys.executable, "-P", "-m", f"dstack.{name}", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env={**os.environ, **env},
            start_new_session=True,  # outlives this CLI and its terminal
            cwd=d,
        )
    (d / f"{name}.pid").write_text(str(proc.pid))
    return Started(name, proc, log_path, offset, time.time_ns())


def endpoint() -> Endpoint:
    return Endpoint(f"unix://{socket_path()}", _secret(local_dir() / "admin-token"), local=True)


def ensure_running() -> Endpoint:
    """Starts what is not running yet; returns the local coordinator's endpoint."""
    d = local_dir()
    with _lock():
        ep = endpoint()
        join = _secret(d / "join-token")
        if _alive(d / "coordinator.pid", "coordinator") is None:
            # Said every time, so that local mode is never a silent stand-in for a team coordinator.
            print(
                f"dstack: starting the local coordinator and agent in {d} (no coordinator is configured;"
                " `dstack config --coordinator HOST:PORT` uses a team's)",
                file=sys.stderr,
            )
            coordinator = _spawn(
                "coordinator",
                [
                    "--state-dir",
                    str(d / "server"),
                    "--listen",
                    ep.address,
                    "--local-mode",
                    "--fail-unsatisfiable",
                    # The HTTP API on 127.0.0.1, a free port (its URL in server/http-url): `dstack dashboard`.
                    "--http-port",
                    "0",
                ],
                {"DSTACK_ADMIN_TOKEN": ep.token, "DSTACK_JOIN_TOKEN": join},
            )
            _wait_until(ep, coordinator, lambda client: bool(client.info(timeout=1.0)))
        if _alive(d / "agent.pid", "agent") is None:
            agent = _spawn(
                "agent",
                # The user's own jobs on their own box, as their own user (no job user to create first).
                ["--coordinator", ep.address, "--home", str(d / "agent"), "--name", LOCAL_AGENT, "--job-user", "none"],
                {"DSTACK_JOIN_TOKEN": join},
            )
            _wait_until(ep, agent, lambda client: _agent_online_since(client, agent.started_ns))
    return ep


def _agent_online_since(client: Client, since_ns: int) -> bool:
    """The local agent is online and has said so since it was started (not a row left by its predecessor)."""
    return any(
        a.name == LOCAL_AGENT and a.status == "online" and a.last_heartbeat_ns >= since_ns for a in client.list_agents()
    )


def is_running() -> bool:
    return _alive(local_dir() / "coordinator.pid", "coordinator") is not None


def _wait_until(ep: Endpoint, started: Started, ready: Callable[[Client], bool]) -> None:
    """Waits until `ready` says yes; a service that exits meanwhile is reported at once, with its log."""
    from dstack.cli.client import Client

    deadline = time.monotonic() + START_TIMEOUT_S
    client = Client(ep)
    try:
        while True:
            if (failed := started.failure()) is not None:
                raise failed
            with contextlib.suppress(CliError):  # not answering yet
                if ready(client):
                    return
            if time.monotonic() > deadline:
                raise LocalServicesError(f"the local {started.name} did not start in {START_TIMEOUT_S:.0f} s", started)
            time.sleep(0.05)
    finally:
        client.close()


def stop_all(timeout_s: float = 15.0) -> list[str]:
    """Stops the local agent (its jobs are stopped) and then the coordinator; returns what was stopped."""
    d = local_dir()
    stopped = []
    with _lock():
        for name in ("agent", "coordinator"):
            pid = _alive(d / f"{name}.pid", name)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while _alive(d / f"{name}.pid", name) is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(d / f"{name}.pid", name) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            (d / f"{name}.pid").unlink(missing_ok=True)
            stopped.append(name)
    return stopped
