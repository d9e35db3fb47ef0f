"""Issue 13 item 9 end to end: a 2022 custom provider from a `file://` repository runs to `done` in local mode."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Cluster, LocalMode, search, write_project

pytestmark = pytest.mark.integration

PROVIDERS_YAML = """
providers:
  - name: greet
    image: python:3.11
    commands:
      - bash provider.sh
"""
# The provider program: reads the workflow's fields (DSTACK_WORKFLOW_DATA), uses a file of its own repository and
# writes the workflow's artifact in the workflow's folder.
PROVIDER_SH = """
set -e
mkdir -p "$DSTACK_WORKFLOW_DIR/output"
printf '%s' "$DSTACK_WORKFLOW_DATA" > "$DSTACK_WORKFLOW_DIR/output/data.json"
echo "$(cat greeting.txt) from $DSTACK_PROVIDER_NAME"
"""


def _git_repo(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    env = {"PATH": "/usr/bin:/bin", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t"}
    env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "provider"]):
        subprocess.run(["git", *args], cwd=path, check=True, env=env)
    return path


def test_custom_provider_from_file_repository_runs_to_done(local: LocalMode, tmp_path: Path) -> None:
    repo = _git_repo(
        tmp_path / "provider-repo",
        {".dstack/providers.yaml": PROVIDERS_YAML, "provider.sh": PROVIDER_SH, "greeting.txt": "Hello"},
    )
    project = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: hello
            provider:
              name: greet
              repo: file://{repo}
            nodes: 2
            resources:
              nodes: 2
            artifacts: ["output"]
        """,
    )
    r = local.cli("run", "hello", cwd=project, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello from greet\n"
    name = search(r"(\S+) submitted", r.stderr).group(1)
    runs = json.loads(local.cli("ps", "-a", "--json", cwd=project).stdout)
    assert next(x for x in runs if x["name"] == name)["status"] == "done"

    out = tmp_path / "dl"
    d = local.cli("artifacts", "download", name, "-o", str(out), cwd=project)
    assert d.returncode == 0, d.stderr
    data = json.loads((out / "output" / "data.json").read_text())
    assert data["nodes"] == 2 and data["resources"] == {"nodes": 2}
    assert not (repo / "output").exists()  # the provider's repository is read, never written


def test_unreachable_provider_repository_fails_before_submitting(local: LocalMode, tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: hello
            provider: {{name: greet, repo: "file://{tmp_path}/missing"}}
        """,
    )
    r = local.cli("run", "hello", cwd=project)
    assert r.returncode != 0
    assert "cannot fetch provider repository" in r.stderr and "Traceback" not in r.stderr
    assert "submitted" not in r.stderr


def test_a_branch_of_a_built_in_provider_is_not_available_yet(local: LocalMode, tmp_path: Path) -> None:
    """`torchrun@experimental` (ivan-bokov/dstack-test-providers, 2022): torchrun is built in now, its
    branches are not."""
    project = write_project(
        tmp_path / "p", "workflows:\n  - name: ddp\n    provider: torchrun@experimental\n    nodes: 2\n"
    )
    r = local.cli("run", "ddp", cwd=project)
    assert r.returncode != 0 and "provider 'torchrun@experimental' is not available yet" in r.stderr
    assert "unknown field" not in r.stderr and "Traceback" not in r.stderr


def test_an_agent_that_cannot_reach_the_repository_runs_the_provider(cluster: Cluster, tmp_path: Path) -> None:
    """The provider's files travel with the code: submitted while no agent is connected, then the repository and the
    CLI's cached copy are deleted; the agent that joins afterwards cannot see the `file://` path (nor could one on
    another machine), and the job still runs the provider's own files at the pinned commit to `done`."""
    repo = _git_repo(
        tmp_path / "provider-repo",
        {".dstack/providers.yaml": PROVIDERS_YAML, "provider.sh": PROVIDER_SH, "greeting.txt": "Hello"},
    )
    project = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: hello
            provider:
              name: greet
              repo: file://{repo}
            working_dir: sub
        """,
        {"sub/README": "the workflow's own folder\n"},
    )
    cluster.start_coordinator()
    r = cluster.cli("run", "-d", "hello", cwd=project)
    assert r.returncode == 0, r.stderr
    name = r.stdout.strip()
    shutil.rmtree(repo)
    shutil.rmtree(tmp_path / "cli-home" / "cache" / "providers")
    cluster.start_agent()
    run = cluster.wait_status(name, {"done", "failed"}, timeout=120)
    logs = cluster.cli("logs", name, cwd=project)
    assert run["status"] == "done", logs.stdout + logs.stderr
    assert "Hello from greet" in logs.stdout  # greeting.txt, found from working_dir `sub` through the relative path


def test_a_built_in_name_runs_the_built_in_and_repo_dot_runs_the_projects_entry(
    local: LocalMode, tmp_path: Path
) -> None:
    """Provider-name precedence both ways, through the real CLI and agent: the project's providers.yaml defines
    `bash` (as dstack's own July 2022 file did); `provider: bash` runs the built-in, and a note names the shadowed
    entry at its line; `provider: {name: bash, repo: .}` runs the entry, with a note at the workflow's line."""
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: builtin
            provider: bash
            commands: [echo from the built-in]
          - name: entry
            provider: {name: bash, repo: .}
            commands: [echo never run by the built-in]
        """,
        {
            ".dstack/providers.yaml": "providers:\n  - name: bash\n    image: python:3.11\n"
            "    commands: [echo from the entry]\n",
        },
    )
    v = local.cli("validate", cwd=project)
    assert v.returncode == 0, v.stdout + v.stderr
    assert ".dstack/providers.yaml:2:11: the project's provider 'bash' is shadowed" in v.stdout + v.stderr
    assert ".dstack/workflows.yaml:7:34: provider 'bash' is the project's own entry" in v.stdout + v.stderr

    builtin = local.cli("run", "builtin", cwd=project, timeout=300)
    assert builtin.returncode == 0, builtin.stderr
    assert builtin.stdout == "from the built-in\n"
    assert "providers.yaml:2:11: the project's provider 'bash' is shadowed by the built-in" in builtin.stderr

    entry = local.cli("run", "entry", cwd=project, timeout=300)
    assert entry.returncode == 0, entry.stderr
    assert entry.stdout == "from the entry\n"
    assert "workflows.yaml:7:34: provider 'bash' is the project's own entry" in entry.stderr
    assert "shadowed" not in entry.stderr


# A provider that returns several job specs, as 2022's built-in providers did from August 2022 (their
# `create_job_specs()` ran in the CLI and every spec was submitted into the one run: dstackai/dstack bff1ac2
# cli/dstack/providers/__init__.py `submit_jobs`, `_torchrun/main.py` a master and N-1 workers), installed as a
# plugin the way a package adds one (a `dstack.providers` entry point).
TWO_STEP = """
from dstack.cli.providers.base import Provider
from dstack.protos.v1 import common_pb2


class TwoStep(Provider):
    name = "twostep"
    open_fields = True

    def commands(self, wf):
        return []

    def job_specs(self, wf):
        rows = int(wf.node.get("rows", 3))
        prepare = common_pb2.JobSpec(
            job_name=f"{wf.name}-prepare",
            workflow=wf.name,
            provider=self.name,
            commands=[f"seq {rows} > data/rows.txt", "echo prepare wrote $(wc -l < data/rows.txt) rows"],
            artifacts=[common_pb2.ArtifactSpec(path="data")],
        )
        train = common_pb2.JobSpec(
            job_name=f"{wf.name}-train",
            workflow=wf.name,
            provider=self.name,
            depends_on=[prepare.job_name],
            commands=["echo train read $(paste -sd+ data/rows.txt | bc) from prepare", "echo m > model/m.txt"],
            artifacts=[common_pb2.ArtifactSpec(path="model")],
        )
        return [prepare, train]
"""


def test_a_provider_that_returns_several_job_specs_runs_each_as_a_job(local: LocalMode, tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    (site / "twostep-1.0.dist-info").mkdir(parents=True)
    (site / "twostep_mod.py").write_text(TWO_STEP)
    (site / "twostep-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: twostep\nVersion: 1.0\n")
    (site / "twostep-1.0.dist-info" / "entry_points.txt").write_text(
        "[dstack.providers]\ntwostep = twostep_mod:TwoStep\n"
    )
    local.extra_env["PYTHONPATH"] = os.pathsep.join([os.environ["PYTHONPATH"], str(site)])
    project = write_project(tmp_path / "p", "workflows:\n  - name: pipeline\n    provider: twostep\n    rows: 4\n")

    r = local.cli("run", "pipeline", cwd=project, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    name = search(r"(\S+) submitted", r.stderr).group(1)
    [run] = [x for x in json.loads(local.cli("ps", "-a", "--json", cwd=project).stdout) if x["name"] == name]
    assert run["status"] == "done"
    assert {(j["name"], j["status"]) for j in run["jobs"]} == {("pipeline-prepare", "done"), ("pipeline-train", "done")}
    # each job's lines under its own name
    assert "pipeline-prepare | prepare wrote 4 rows\n" in r.stdout
    assert "pipeline-train | train read 10 from prepare\n" in r.stdout
    assert "pipeline-prepare | train" not in r.stdout and "pipeline-train | prepare" not in r.stdout

    listed = json.loads(local.cli("artifacts", "list", name, "--json", cwd=project).stdout)
    assert sorted((f["job"], f["path"]) for f in listed) == [
        ("pipeline-prepare", "data/rows.txt"),
        ("pipeline-train", "model/m.txt"),  # the input it received is not saved again as its own
    ]
