"""Bad input gets one clear message naming what and where, a non-zero exit, and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Cluster, free_port, write_project

pytestmark = pytest.mark.integration


def no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr + r.stdout


def test_unknown_workflow_lists_the_known_ones(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: download
            provider: bash
            commands: [echo]
          - name: train
            provider: bash
            commands: [echo]
        """,
    )
    r = cluster.cli("run", "trian", cwd=project)
    assert r.returncode != 0
    assert "workflow 'trian' is not defined" in r.stderr
    assert "download, train" in r.stderr
    no_traceback(r)


def test_unknown_run_name(cluster: Cluster) -> None:
    cluster.start_coordinator()
    for args in (["logs", "no-such-run"], ["stop", "no-such-run"], ["artifacts", "list", "no-such-run"]):
        r = cluster.cli(*args)
        assert r.returncode != 0
        assert "run 'no-such-run' does not exist" in r.stderr
        no_traceback(r)


def test_unreachable_coordinator(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "DSTACK_HOME": str(tmp_path), "DSTACK_COORDINATOR": f"127.0.0.1:{port}", "DSTACK_TOKEN": "x"}
    r = subprocess.run([sys.executable, "-m", "dstack.cli", "ps"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0
    assert f"cannot reach the coordinator at 127.0.0.1:{port}" in r.stderr
    no_traceback(r)


def test_wrong_token(cluster: Cluster) -> None:
    cluster.start_coordinator()
    cluster.admin_token, real = "wrong", cluster.admin_token
    r = cluster.cli("ps")
    cluster.admin_token = real
    assert r.returncode != 0
    assert "invalid token" in r.stderr
    no_traceback(r)


@pytest.mark.parametrize(
    ("workflows", "needle", "line"),
    [
        ("workflows:\n  - name: a\n    provider: bash\n    commands: [echo\n", "invalid YAML", 5),
        (
            "workflows:\n  - name: a\n    provider: nope\n",
            "unknown provider 'nope'; known providers: bash, code, curl, docker, lab, notebook, python, torchrun",
            3,
        ),
        ("workflows:\n  - name: a\n    provider: bash\n    comands: [x]\n", "did you mean 'commands'", 4),
        ("workflows:\n  - name: a\n    provider: bash\n", "missing required field 'commands'", 2),
        ("workflows:\n  - provider: bash\n    commands: [x]\n", "missing required field 'name'", 2),
        (
            "workflows:\n  - name: a\n    provider: bash\n    commands: [x]\n    resources:\n      memory: 10XB\n",
            "'10XB' is not a size",
            6,
        ),
        (
            "workflows:\n  - name: a\n    provider: bash\n    commands: [x]\n    artifacts: [../up]\n",
            "must be relative and stay inside",
            5,
        ),
        (
            "workflows:\n  - name: a\n    provider: bash\n    commands: [x]\n  - name: a\n    provider: bash\n"
            "    commands: [y]\n",
            "defined twice",
            5,
        ),
    ],
)
def test_broken_workflow_files(local_tmp: Path, workflows: str, needle: str, line: int) -> None:
    project = local_tmp / "p"
    (project / ".dstack").mkdir(parents=True)
    (project / ".dstack" / "workflows.yaml").write_text(workflows)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSTACK_")}
    env.update(DSTACK_HOME=str(local_tmp / "home"), DSTACK_COORDINATOR="127.0.0.1:1", DSTACK_TOKEN="x")
    r = subprocess.run(
        [sys.executable, "-m", "dstack.cli", "run", "a"],
        capture_output=True,
        text=True,
        env=env,
        cwd=project,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert f"workflows.yaml:{line}:" in r.stderr
    no_traceback(r)


@pytest.fixture
def local_tmp(tmp_path: Path) -> Path:
    return tmp_path


def test_second_coordinator_on_the_same_state_dir_is_refused(cluster: Cluster) -> None:
    cluster.start_coordinator()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dstack.coordinator",
            "--state-dir",
            str(cluster.tmp / "server"),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "another coordinator" in r.stderr and "is already using" in r.stderr
    no_traceback(r)


@pytest.mark.parametrize("args", [["run"], ["ps", "--bogus"], ["nosuchcommand"]])
def test_usage_errors_exit_2_without_traceback(tmp_path: Path, args: list[str]) -> None:
    env = {**os.environ, "DSTACK_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "dstack.cli", *args], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2
    assert "Usage:" in r.stderr
    no_traceback(r)


def test_config_saves_the_coordinator_and_checks_the_token(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSTACK_")}
    env["DSTACK_HOME"] = str(tmp_path / "home")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dstack.cli", *args], capture_output=True, text=True, env=env, timeout=60
        )

    bad = cli("config", "--coordinator", cluster.address, "--token", "wrong", *cluster.transport_args())
    assert bad.returncode != 0 and "invalid token" in bad.stderr
    assert not (tmp_path / "home" / "config.yaml").exists()  # nothing saved on failure
    ok = cli("config", "--coordinator", cluster.address, "--token", cluster.admin_token, *cluster.transport_args())
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "home" / "config.yaml").stat().st_mode & 0o777 == 0o600
    assert cli("ps").returncode == 0
    assert cli("config").stdout.splitlines()[0].startswith(f"coordinator: {cluster.address} (from ")
