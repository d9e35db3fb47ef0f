"""Starting a coordinator: one per address, refused with one line when the address is taken."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
from pathlib import Path

import pytest

from coordinator.server import tcp_bind_error
from tests.conftest import PY, REPO, Cluster

pytestmark = pytest.mark.integration


def test_a_second_coordinator_on_the_same_port_refuses_to_start(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    second = subprocess.run(
        [PY, "-m", "coordinator", "--state-dir", str(tmp_path / "other-server"), "--port", str(cluster.port)],
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
