"""The embedded default: a local coordinator and one local agent, started on first use and reused.

They are the same programs as the team setup (`python -m coordinator`, `python -m agent`), bound
only to a Unix socket, with all state under $DSTACK_HOME/local.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cli.errors import CliError
from cli.home import Endpoint, dstack_home

START_TIMEOUT_S = 20.0


class LocalServicesError(CliError):
    pass


def local_dir() -> Path:
    return dstack_home() / "local"


def socket_path() -> Path:
    sock = local_dir() / "coordinator.sock"
    if len(str(sock)) > 100:  # AF_UNIX paths are limited to 108 bytes
        digest = hashlib.sha256(str(sock).encode()).hexdigest()[:16]
        sock = Path(tempfile.gettempdir()) / f"dstack-{os.getuid()}-{digest}.sock"
    return sock


def _secret(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    local_dir().mkdir(parents=True, exist_ok=True)
    with open(local_dir() / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # two CLIs starting at once start one coordinator
        yield


def _alive(pid_file: Path, module: str) -> int | None:
    """The pid in pid_file if that process is alive and is `python -m MODULE` (not a reused pid)."""
    try:
        pid = int(pid_file.read_text())
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if module.encode() in cmd else None


def _spawn(name: str, args: list[str], env: dict[str, str]) -> None:
    d = local_dir()
    log = open(d / f"{name}.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", name, *args],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        env={**os.environ, **env},
        start_new_session=True,  # outlives this CLI and its terminal
        cwd=d,
    )
    log.close()
    (d / f"{name}.pid").write_text(str(proc.pid))


def endpoint() -> Endpoint:
    return Endpoint(f"unix://{socket_path()}", _secret(local_dir() / "admin-token"), local=True)


def ensure_running() -> Endpoint:
    """Starts what is not running yet; returns the local coordinator's endpoint."""
    d = local_dir()
    with _lock():
        ep = endpoint()
        join = _secret(d / "join-token")
        if _alive(d / "coordinator.pid", "coordinator") is None:
            _spawn(
                "coordinator",
                [
                    "--state-dir",
                    str(d / "server"),
                    "--listen",
                    ep.address,
                    "--local-mode",
                    "--fail-unsatisfiable",
                ],
                {"DSTACK_ADMIN_TOKEN": ep.token, "DSTACK_JOIN_TOKEN": join},
            )
            _wait_ready(ep)
        if _alive(d / "agent.pid", "agent") is None:
            _spawn(
                "agent",
                ["--coordinator", ep.address, "--home", str(d / "agent"), "--name", "local"],
                {"DSTACK_JOIN_TOKEN": join},
            )
    return ep


def _wait_ready(ep: Endpoint) -> None:
    from cli.client import Client

    deadline = time.monotonic() + START_TIMEOUT_S
    client = Client(ep)
    try:
        while True:
            try:
                client.info(timeout=1.0)
                return
            except CliError:
                if time.monotonic() > deadline:
                    raise LocalServicesError(
                        f"the local coordinator did not start; see {local_dir() / 'coordinator.log'}"
                    ) from None
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
