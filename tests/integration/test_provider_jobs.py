"""Issue 13 item 9's last piece: a 2022 providers.yaml program that produces several jobs.

The program imports the compat `dstack` (agent/provider_compat), whose `Provider.start()` writes its jobs to a
file; the agent reads it when the program exits 0 and reports the jobs with DONE; the coordinator adds them
to the run in the step that records the program done (coordinator/provided_jobs.py). Every attack below runs
against real processes: the program's own file is hostile, and so may be an agent.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import LocalMode, search, write_project

pytestmark = pytest.mark.integration

PROVIDERS_YAML = """
providers:
  - name: pipeline
    image: python:3.11
    commands:
      - python3 provider.py
"""
# Written against 2022's API (dstackai/dstack 007d79a cli/dstack/__init__.py): `Job(image, commands, artifacts,
# depends_on)`, `self.workflow.data` the workflow's fields.
PROVIDER_PY = """
from dstack import Job, Provider


class Pipeline(Provider):
    def create_jobs(self):
        rows = int(self.workflow.data.get("rows", 3))
        prepare = Job(
            image="python:3.11",
            commands=[f"mkdir -p data && seq {rows} > data/rows.txt", "echo prepare wrote $(wc -l < data/rows.txt) rows"],
            artifacts=["data"],
        )
        train = Job(
            image="python:3.11",
            commands=["echo train read $(paste -sd+ data/rows.txt | bc) from prepare", "mkdir -p model", "echo m > model/m.txt"],
            artifacts=["model"],
            depends_on=[prepare],
        )
        return [prepare, train]


if __name__ == "__main__":
    Pipeline().start()
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


def _run(local: LocalMode, project: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    r = local.cli("run", "hello", cwd=project, timeout=300)
    name = search(r"(\S+) submitted", r.stderr).group(1)
    [run] = [x for x in json.loads(local.cli("ps", "-a", "--json", cwd=project).stdout) if x["name"] == name]
    return r, run


def test_a_provider_program_from_a_file_repository_adds_two_dependent_jobs(local: LocalMode, tmp_path: Path) -> None:
    repo = _git_repo(tmp_path / "provider-repo", {".dstack/providers.yaml": PROVIDERS_YAML, "provider.py": PROVIDER_PY})
    project = write_project(
        tmp_path / "p",
        f"workflows:\n  - name: hello\n    provider: {{name: pipeline, repo: 'file://{repo}'}}\n    rows: 4\n",
    )
    r, run = _run(local, project)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert run["status"] == "done"
    jobs = {(j["name"], j["status"]) for j in run["jobs"]}  # type: ignore[attr-defined]
    assert jobs == {("hello", "done"), ("hello-1", "done"), ("hello-2", "done")}
    assert "hello-1 | prepare wrote 4 rows\n" in r.stdout
    assert "hello-2 | train read 10 from prepare\n" in r.stdout  # the first's artifact, received by the second
    assert "hello-1 | train" not in r.stdout and "hello-2 | prepare" not in r.stdout
    listed = json.loads(local.cli("artifacts", "list", run["name"], "--json", cwd=project).stdout)  # type: ignore[arg-type]
    assert sorted((f["job"], f["path"]) for f in listed) == [("hello-1", "data/rows.txt"), ("hello-2", "model/m.txt")]
