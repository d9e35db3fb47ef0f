"""A coordinator whose state it cannot use says why and exits non-zero, with no traceback: a database of
garbage bytes, a truncated one, a read-only state folder, a read-only database file (real processes)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PY, REPO, Cluster, free_port

pytestmark = pytest.mark.integration

TOKENS = {"DSTACK_ADMIN_TOKEN": "a", "DSTACK_JOIN_TOKEN": "b"}


def serve(state: Path, read_only: Path | None = None, tokens: bool = True) -> subprocess.CompletedProcess[str]:
    """`dstack server` on `state`; with `read_only`, that path is bind-mounted read-only for the process
    (in a user and mount namespace of its own: running as root, file modes alone would not stop it)."""
    cmd = [PY, "-m", "dstack.coordinator", "--state-dir", str(state), "--listen", f"127.0.0.1:{free_port()}"]
    cmd.append("--insecure")
    if read_only is not None:
        cmd = ["unshare", "-rm", "sh", "-c", f'mount --bind -o ro "{read_only}" "{read_only}" && exec "$@"', "-", *cmd]
    env = {**os.environ, **(TOKENS if tokens else {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=60)


def read_only_mounts_work(tmp: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp / "probe"
    probe.mkdir()
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f'mount --bind -o ro "{probe}" "{probe}" && ! touch "{probe}/x"'],
        capture_output=True,
    )
    return r.returncode == 0


def assert_clear_failure(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("dstack server: "), r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def a_used_state(cluster: Cluster) -> Path:
    """The state folder of a real coordinator that ran and stopped."""
    cluster.start_coordinator()
    cluster.stop_all()
    return cluster.tmp / "server"


def test_a_database_of_garbage_bytes(tmp_path: Path) -> None:
    state = tmp_path / "server"
    state.mkdir(mode=0o700)
    (state / "coordinator.db").write_bytes(os.urandom(64 * 1024))
    assert_clear_failure(serve(state), "is damaged or not a dstack database", "file is not a database")


def test_a_truncated_database(cluster: Cluster) -> None:
    state = a_used_state(cluster)
    db = state / "coordinator.db"
    os.truncate(db, db.stat().st_size // 8)
    assert_clear_failure(serve(state), "is damaged or not a dstack database", str(db))


def test_a_read_only_state_folder(cluster: Cluster, tmp_path: Path) -> None:
    if not read_only_mounts_work(tmp_path):
        pytest.skip("no user namespaces here to mount a read-only folder")
    state = a_used_state(cluster)
    assert_clear_failure(serve(state, read_only=state), "Read-only file system", "must be a folder this user can write")
    fresh = tmp_path / "fresh"
    fresh.mkdir(mode=0o700)
    assert_clear_failure(serve(fresh, read_only=fresh, tokens=False), "cannot write", "admin-token")


def test_a_read_only_database_file(cluster: Cluster, tmp_path: Path) -> None:
    if not read_only_mounts_work(tmp_path):
        pytest.skip("no user namespaces here to mount a read-only file")
    state = a_used_state(cluster)
    r = serve(state, read_only=state / "coordinator.db")
    assert_clear_failure(r, "cannot write the database", "must be writable by this user")
