"""Starting a coordinator: one per address, refused with one line when the address is taken."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
from pathlib import Path

import pytest

from dstack.coordinator.server import tcp_bind_error, unix_socket_answers
from tests.conftest import PY, REPO, Cluster, wait_for

pytestmark = pytest.mark.integration


def test_a_second_coordinator_on_the_same_port_refuses_to_start(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    second = subprocess.run(
        [PY, "-m", "dstack.coordinator", "--state-dir", str(tmp_path / "other-server"), "--port", str(cluster.port)],
        capture_output=True,
        text=True,
        env={**os.environ, "DSTACK_ADMIN_TOKEN": "other-admin", "DSTACK_JOIN_TOKEN": "other-join"},
        cwd=REPO,
        timeout=60,
    )
    assert second.returncode != 0
    assert second.stderr.splitlines()[-1] == (
        f"dstack server: cannot listen on 127.0.0.1:{cluster.port}: the address is in use (another coordinator?)"
    )
    assert "Traceback" not in second.stderr
    # gRPC's own C-level bind error is not printed: the check above comes first.
    assert "add_port" not in second.stderr
    # Every call reaches the first coordinator (with SO_REUSEPORT, most went to the second one).
    for _ in range(8):
        r = cluster.cli("ps")
        assert r.returncode == 0, r.stderr
    assert cluster.coordinator is not None and cluster.coordinator.popen.poll() is None


def test_bind_check_reports_a_port_in_use_and_accepts_a_free_one() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = tcp_bind_error(f"127.0.0.1:{port}")
        assert err is not None and err.errno == errno.EADDRINUSE
    # Let go: the port is free again (SO_REUSEADDR, as gRPC binds, ignores what lingers).
    assert tcp_bind_error(f"127.0.0.1:{port}") is None
    assert tcp_bind_error("unix:///tmp/x.sock") is None


def test_a_second_coordinator_on_the_same_unix_socket_refuses_to_start(tmp_path: Path) -> None:
    """Deleting a live coordinator's socket file and binding anew would cut it off without a word."""
    sock = Path("/tmp") / f"dstack-test-{os.getpid()}-{tmp_path.name[-12:]}.sock"  # AF_UNIX: 108 bytes at most
    env = {**os.environ, "DSTACK_ADMIN_TOKEN": "a", "DSTACK_JOIN_TOKEN": "j"}
    first = subprocess.Popen(
        [PY, "-m", "dstack.coordinator", "--state-dir", str(tmp_path / "a"), "--listen", f"unix://{sock}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=REPO,
    )
    try:
        wait_for(lambda: sock.exists() and unix_socket_answers(sock), what="the first coordinator's socket")
        second = subprocess.run(
            [PY, "-m", "dstack.coordinator", "--state-dir", str(tmp_path / "b"), "--listen", f"unix://{sock}"],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=60,
        )
        assert second.returncode != 0
        assert second.stderr.splitlines()[-1] == (
            f"dstack server: cannot listen on unix://{sock}: another process is listening there"
        )
        assert unix_socket_answers(sock) and first.poll() is None
    finally:
        first.terminate()
        first.wait(30)
        sock.unlink(missing_ok=True)
