"""The embedded default: no configuration, a local coordinator and agent started on demand."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import LocalMode, search, write_project

pytestmark = pytest.mark.integration


def test_zero_config_run_ps_logs_artifacts(local: LocalMode, tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: hello
            provider: bash
            commands:
              - echo "Hello, world!"
              - mkdir -p model/sub && echo weights > model/sub/w.bin
            artifacts: ["model"]
        """,
    )
    r = local.cli("run", "hello", cwd=project)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello, world!\n"
    assert "uploaded" in r.stderr  # first run: the code is sent
    name = search(r"(\S+) submitted", r.stderr).group(1)
    assert re.fullmatch(r"[a-z]+-[a-z]+-\d+", name)

    # Second run of unchanged code: nothing is uploaded again.
    r2 = local.cli("run", "hello", cwd=project)
    assert r2.returncode == 0
    assert "uploaded" not in r2.stderr

    ps = local.cli("ps", "-a", "--json", cwd=project)
    runs = json.loads(ps.stdout)
    first = next(x for x in runs if x["name"] == name)
    assert {"name", "workflow", "status", "submitted_at", "tags"} <= set(first)
    assert first["status"] == "done" and first["workflow"] == "hello"

    logs = local.cli("logs", name, cwd=project)
    assert logs.stdout == "Hello, world!\n"

    listed = local.cli("artifacts", "list", name, "--json", cwd=project)
    files = json.loads(listed.stdout)
    assert [(f["path"], f["size"]) for f in files] == [("model/sub/w.bin", 8)]

    out = tmp_path / "dl"
    d = local.cli("artifacts", "download", name, "-o", str(out), cwd=project)
    assert d.returncode == 0, d.stderr
    assert (out / "model" / "sub" / "w.bin").read_text() == "weights\n"

    # the manifest is in the local store
    manifests = list(local.home.glob(f"local/server/storage/runs/{name}/hello/manifest.json"))
    assert manifests and json.loads(manifests[0].read_text())["files"][0]["path"] == "model/sub/w.bin"


def test_local_mode_fails_a_job_no_agent_can_run(local: LocalMode, tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: train
            provider: bash
            commands: ["python train.py"]
            resources:
              gpu: 1
        """,
    )
    r = local.cli("run", "train", cwd=project, timeout=60)
    assert r.returncode == 1
    assert "needs 1 GPU; the largest agent has 0 GPUs" in r.stderr
    assert "Traceback" not in r.stderr


def test_local_stop_then_state_survives(local: LocalMode, tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: hi
            provider: bash
            commands: ["echo hi"]
        """,
    )
    r = local.cli("run", "hi", cwd=project)
    assert r.returncode == 0
    name = search(r"(\S+) submitted", r.stderr).group(1)
    stopped = local.cli("local", "stop", cwd=project)
    assert "coordinator" in stopped.stdout
    # the next command starts the services again and the run is still there
    logs = local.cli("logs", name, cwd=project)
    assert logs.stdout == "hi\n"
