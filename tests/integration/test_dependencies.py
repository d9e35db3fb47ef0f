"""Runtime and tag dependencies and tags, through the real CLI, coordinator and agent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Cluster, RunJSON, search, write_project

pytestmark = pytest.mark.integration

SEED = """
workflows:
  - name: download
    help: "Downloads the training data"
    provider: python
    before_run: ["echo preparing"]
    file: download.py
    artifacts: ["data"]
  - name: train
    help: "Trains a model and saves the checkpoints"
    depends-on:
      - download
    provider: python
    file: train.py
    artifacts: ["model"]
  - name: train-tagged
    depends-on:
      - download:latest
    provider: python
    file: train.py
    artifacts: ["model"]
  - name: train-deps
    deps:
      - workflow: download
    provider: python
    file: train.py
    artifacts: ["model"]
"""
FILES = {
    "download.py": """
        import os
        os.makedirs("data/sub", exist_ok=True)
        open("data/sub/train.csv", "w").write("x,y\\n" + os.environ["RUN_NAME"] + "\\n")
        print("downloaded")
    """,
    "train.py": """
        import os
        rows = open("data/sub/train.csv").read().splitlines()
        os.makedirs("model", exist_ok=True)
        open("model/weights.txt", "w").write(rows[1])
        print("trained on data from", rows[1], "with batch size", os.environ.get("BATCH_SIZE", "none"))
    """,
    ".dstack/variables.yaml": """
        variables:
          train:
            batch-size: 64
    """,
}


def runs_named(cluster: Cluster, workflow: str) -> list[RunJSON]:
    return [r for r in cluster.runs() if r["workflow"] == workflow]


def submitted(stderr: str) -> str:
    return search(r"(\S+) submitted", stderr).group(1)


def test_seed_example_runtime_and_tag_dependencies(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    root = write_project(tmp_path / "p", SEED, FILES)

    # Runtime dependency: one run, download then train; train sees download's artifacts.
    r = cluster.cli("run", "train", "--batch-size", "32", cwd=root)
    assert r.returncode == 0, r.stderr
    run = submitted(r.stderr)
    assert "download | preparing" in r.stdout and "download | downloaded" in r.stdout
    assert f"train | trained on data from {run} with batch size 32" in r.stdout
    jobs = next(x for x in cluster.runs() if x["name"] == run)["jobs"]
    assert [j["name"] for j in jobs] == ["download", "train"]

    # A tag dependency needs the tag.
    r = cluster.cli("run", "train-tagged", cwd=root)
    assert r.returncode == 2 and "tag 'latest' does not exist" in r.stderr and "workflows.yaml:" in r.stderr

    # `-t latest` tags a run of download when it finishes done; train-tagged then uses its artifacts
    # without running download again.
    r = cluster.cli("run", "download", "-t", "latest", cwd=root)
    assert r.returncode == 0, r.stderr
    tagged = submitted(r.stderr)
    tags = json.loads(cluster.cli("tags", "list", "--json", cwd=root).stdout)
    assert [(t["name"], t["run"], t["workflow"]) for t in tags] == [("latest", tagged, "download")]
    downloads_before = len(runs_named(cluster, "download"))
    r = cluster.cli("run", "train-tagged", cwd=root)
    assert r.returncode == 0, r.stderr
    # train's variables are train's alone (variables.yaml has no section for train-tagged)
    assert f"trained on data from {tagged} with batch size none" in r.stdout
    assert len(runs_named(cluster, "download")) == downloads_before

    # `download:on-x` needs `on-x` in this project's repository: another folder's tag is not seen...
    other = write_project(tmp_path / "q", "workflows:\n  - name: x\n    provider: bash\n    commands: [true]\n")
    assert cluster.cli("run", "x", "-t", "on-x", cwd=other).returncode == 0
    wrong = (root / ".dstack" / "workflows.yaml").read_text().replace("download:latest", "download:on-x")
    (root / ".dstack" / "workflows.yaml").write_text(wrong)
    r = cluster.cli("run", "train-tagged", cwd=root)
    assert r.returncode == 2 and "tag 'on-x' does not exist in repository local/admin/p" in r.stderr
    # ... and one here must be on a run of download.
    assert cluster.cli("tags", "add", "on-x", run).returncode == 0
    r = cluster.cli("run", "train-tagged", cwd=root)
    assert r.returncode == 2 and "tag 'on-x' is on run" in r.stderr and "not of 'download'" in r.stderr

    # deps: - workflow: download  uses the latest run of download that finished done.
    r = cluster.cli("run", "train-deps", cwd=root)
    assert r.returncode == 0, r.stderr
    assert f"trained on data from {tagged}" in r.stdout


def test_diamond_runs_each_workflow_once_and_a_failure_stops_dependants(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    root = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: a
            provider: bash
            commands: ["mkdir -p out-a && echo a > out-a/f"]
            artifacts: [out-a]
          - name: b
            depends-on: [a]
            provider: bash
            commands: ["cat out-a/f", "mkdir -p out-b && echo b > out-b/f"]
            artifacts: [out-b]
          - name: c
            depends-on: [a]
            provider: bash
            commands: ["cat out-a/f", "mkdir -p out-c && echo c > out-c/f"]
            artifacts: [out-c]
          - name: d
            depends-on: [b, c]
            provider: bash
            commands: ["cat out-b/f out-c/f", "test ! -e out-a  # only direct dependencies' artifacts"]
          - name: broken
            provider: bash
            commands: ["exit 1"]
          - name: after-broken
            depends-on: [broken]
            provider: bash
            commands: ["echo never"]
        """,
    )
    r = cluster.cli("run", "d", cwd=root)
    assert r.returncode == 0, r.stderr
    run = next(x for x in cluster.runs() if x["name"] == submitted(r.stderr))
    assert sorted(j["name"] for j in run["jobs"]) == ["a", "b", "c", "d"]
    assert "b | a" in r.stdout and "c | a" in r.stdout and "d | b" in r.stdout and "d | c" in r.stdout

    r = cluster.cli("run", "after-broken", cwd=root)
    assert r.returncode == 1
    run = next(x for x in cluster.runs() if x["name"] == submitted(r.stderr))
    job = next(j for j in run["jobs"] if j["name"] == "after-broken")
    assert job["status"] == "failed" and job["message"] == "dependency 'broken' failed"
    assert "never" not in r.stdout


def test_tags_refuse_unfinished_and_failed_runs(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    root = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: slow
            provider: bash
            commands: ["sleep 30"]
          - name: fail
            provider: bash
            commands: ["exit 2"]
          - name: ok
            provider: bash
            commands: ["true"]
        """,
    )
    slow = cluster.cli("run", "-d", "slow", cwd=root).stdout.strip()
    r = cluster.cli("tags", "add", "t1", slow)
    assert r.returncode != 0 and "has not finished" in r.stderr
    failed = submitted(cluster.cli("run", "fail", cwd=root).stderr)
    r = cluster.cli("tags", "add", "t1", failed)
    assert r.returncode != 0 and "did not finish done" in r.stderr
    ok = submitted(cluster.cli("run", "ok", cwd=root).stderr)
    assert cluster.cli("tags", "add", "t1", ok).returncode == 0
    r = cluster.cli("tags", "add", "t1", ok)
    assert r.returncode != 0 and "already exists" in r.stderr
    assert cluster.cli("tags", "delete", "t1", cwd=root).returncode == 0
    r = cluster.cli("tags", "delete", "t1", cwd=root)
    assert r.returncode != 0 and "tag 't1' does not exist" in r.stderr
    cluster.cli("stop", slow)


def test_cycles_and_unknown_dependencies_are_errors(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    root = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: a
            depends-on: [b]
            provider: bash
            commands: [echo]
          - name: b
            depends-on: [a]
            provider: bash
            commands: [echo]
          - name: c
            depends-on: [nope]
            provider: bash
            commands: [echo]
        """,
    )
    r = cluster.cli("run", "a", cwd=root)
    assert r.returncode == 2 and "dependency cycle: a -> b -> a" in r.stderr and "workflows.yaml:" in r.stderr
    r = cluster.cli("run", "c", cwd=root)
    assert r.returncode == 2 and "depends-on names 'nope', which is not a workflow" in r.stderr
    assert cluster.runs() == []  # none of these started anything


def test_an_uploaded_folder_serves_as_a_tag_with_the_local_store(cluster: Cluster, tmp_path: Path) -> None:
    # The folder store cannot presign: the CLI streams through the coordinator (PutArtifact).
    cluster.start_coordinator()
    cluster.start_agent()
    root = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: train
            depends-on: ["download:v1"]
            provider: bash
            commands: ["cat data/sub/train.csv"]
        """,
        {"data/sub/train.csv": "x,y\n3,4\n", "data/empty": ""},
    )
    r = cluster.cli("artifacts", "upload", "data", "-t", "v1", "-w", "download", "--prefix", "data", cwd=root)
    assert r.returncode == 0, r.stderr
    r = cluster.cli("run", "train", cwd=root)
    assert r.returncode == 0, r.stderr
    assert "x,y\n3,4" in r.stdout
    listed = json.loads(
        cluster.cli(
            "artifacts", "list", json.loads(cluster.cli("tags", "list", "--json", cwd=root).stdout)[0]["run"], "--json"
        ).stdout
    )
    assert sorted(f["path"] for f in listed) == ["data/empty", "data/sub/train.csv"]
    r = cluster.cli("artifacts", "upload", "data", "-t", "v1", "--prefix", "data", cwd=root)
    assert r.returncode == 1 and "tag 'v1' already exists" in r.stderr
