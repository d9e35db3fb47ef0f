"""Variables, overrides, `${{ run.args }}`, `${{ run.name }}`, `env:` and merged workflow files,
through the real CLI, coordinator and agent."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ArtifactJSON, Cluster, search, wait_for, write_project

pytestmark = pytest.mark.integration


def project(tmp_path: Path) -> Path:
    root = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: train
            help: "Trains a model"
            provider: bash
            env:
              - MODE=fast
              - CALLER_TOKEN
            commands:
              - echo "bs=$BATCH_SIZE lr=$LR seed=$SEED epochs=${{ epochs }}"
              - echo "args=${{ run.args }}"
              - echo "name=${{ run.name }} env=$RUN_NAME"
              - echo "mode=$MODE token=$CALLER_TOKEN"
        """,
        {
            ".dstack/variables.yaml": """
            variables:
              global:
                seed: 1
              train:
                batch-size: 64
                lr: 1.0
                epochs: 2
            """,
            ".dstack/workflows/more.yml": """
            workflows:
              - name: extra
                provider: python
                file: main.py
            """,
            "main.py": "import sys\nprint('extra', sys.argv[1:])\n",
        },
    )
    return root


def test_variables_overrides_and_run_templates(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    root = project(tmp_path)
    env = {**cluster.env(), "CALLER_TOKEN": "from-caller"}
    r = subprocess.run(
        [sys.executable, "-m", "dstack.cli", "run", "train", "--batch-size", "128", "--epochs=5", "a b", "--flag"],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    name = search(r"(\S+) submitted", r.stderr).group(1)
    assert r.stdout.splitlines() == [
        "bs=128 lr=1.0 seed=1 epochs=5",
        "args='a b' --flag",
        f"name={name} env={name}",
        "mode=fast token=from-caller",
    ]
    # a workflow from .dstack/workflows/*.yml; extra arguments go to the python script
    r = cluster.cli("run", "extra", "--x", "1", cwd=root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "extra ['--x', '1']"


def test_workflow_help_lists_variables(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    r = cluster.cli("run", "train", "--help", cwd=project(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "Trains a model" in r.stdout
    assert re.search(r"--batch-size\s+default: 64\s+env: BATCH_SIZE", r.stdout)
    assert "--seed" in r.stdout


def test_language_errors(tmp_path: Path) -> None:
    root = project(tmp_path)
    (root / ".dstack" / "workflows" / "dup.yaml").write_text("workflows:\n  - name: train\n    provider: bash\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSTACK_") and k != "CALLER_TOKEN"}
    env.update(DSTACK_HOME=str(tmp_path / "h"), DSTACK_COORDINATOR="127.0.0.1:1", DSTACK_TOKEN="x")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dstack.cli", "run", *args], capture_output=True, text=True, env=env, cwd=root
        )

    r = run("train")
    assert r.returncode == 2 and "defined twice (first at" in r.stderr and "workflows.yaml:3" in r.stderr
    (root / ".dstack" / "workflows" / "dup.yaml").unlink()
    r = run("train")  # CALLER_TOKEN is not set for this caller: empty, with a note (issue 13 item 5)
    assert r.returncode != 0 and "CALLER_TOKEN from your environment, but it is not set" in r.stderr
    assert "note: " in r.stderr and "workflows.yaml:8:" in r.stderr and "Traceback" not in r.stderr
    assert "127.0.0.1:1" in r.stderr  # it got as far as the coordinator
    text = (root / ".dstack" / "workflows.yaml").read_text().replace("${{ epochs }}", "${{ epoch }}")
    (root / ".dstack" / "workflows.yaml").write_text(text)
    env["CALLER_TOKEN"] = "t"
    r = run("train")
    assert r.returncode == 2 and "${{ epoch }} is not defined" in r.stderr and "workflows.yaml:10:" in r.stderr


def test_mounted_artifacts_are_saved_while_the_job_runs(cluster: Cluster, tmp_path: Path) -> None:
    import json

    cluster.start_coordinator()
    cluster.start_agent("agent-1", "--mount-sync", "0.3")
    root = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: long
            provider: bash
            commands:
              - mkdir -p logs model
              - echo step-1 > logs/progress.txt
              - sleep 30
              - echo final > model/m.bin
            artifacts:
              - path: logs
                mount: true
              - model
        """,
    )
    name = cluster.cli("run", "-d", "long", cwd=root).stdout.strip()

    def artifacts() -> list[ArtifactJSON]:
        files: list[ArtifactJSON] = json.loads(cluster.cli("artifacts", "list", name, "--json").stdout)
        return files

    files = wait_for(artifacts, timeout=20, interval=0.3, what="the mounted artifact to be saved")
    assert [f["path"] for f in files] == ["logs/progress.txt"]  # while the job still runs
    assert cluster.run_info(name)["status"] == "running"
    cluster.cli("stop", name)


def test_artifact_symlink_out_of_the_tree_is_an_error(tmp_path: Path) -> None:
    root = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: w
            provider: bash
            commands: [echo]
            artifacts: [escape]
        """,
    )
    (root / "escape").symlink_to(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSTACK_")}
    env.update(DSTACK_HOME=str(tmp_path / "h"), DSTACK_COORDINATOR="127.0.0.1:1", DSTACK_TOKEN="x")
    r = subprocess.run(
        [sys.executable, "-m", "dstack.cli", "run", "w"], capture_output=True, text=True, env=env, cwd=root
    )
    assert r.returncode == 2 and "leads through a symlink to" in r.stderr and "workflows.yaml:6:" in r.stderr
