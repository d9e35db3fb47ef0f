"""Issue 13 items 6 and 8 end to end, through the real CLI, coordinator and agent: a two-step chain with each 2022
spelling of a dependency (in this repository and in a second one), and the early-2022 syntax (image and
commands without a provider, `template:`, `depends-on: {repo, workflows}`, `$model`, `$run_name`, `$job_id`,
`$variables_as_args`) running to done in a container."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import Cluster, search, write_project
from tests.dockerd import BUSYBOX, Dockerd
from tests.integration.test_docker import docker_agent

pytestmark = pytest.mark.integration

B_REMOTE = "git@git.example.com:team/b.git"
PRODUCER = """
  - name: download
    provider: bash
    commands: ['mkdir -p data && echo "data of {mark} from $RUN_NAME" > data/origin.txt']
    artifacts: [data]
"""
CONSUMERS = """
  - name: by-workflow
    provider: bash
    deps:
      - download
    commands: [cat data/origin.txt]
  - name: by-tag
    provider: bash
    deps:
      - :latest
    commands: [cat data/origin.txt]
  - name: by-workflow-tag
    provider: bash
    deps:
      - download:latest
    commands: [cat data/origin.txt]
  - name: by-mapping-with-mount
    provider: bash
    deps:
      - {workflow: download, mount: true}
      - tag: latest
        mount: true
    commands: [cat data/origin.txt]
  - name: chain-object
    provider: bash
    depends-on:
      repo:
        include: [main.sh, lib]
      workflows: [download]
    commands: [cat data/origin.txt, sh main.sh]
  - name: b-by-workflow
    provider: bash
    deps:
      - team/b/download
    commands: [cat data/origin.txt]
  - name: b-by-tag
    provider: bash
    deps:
      - :team/b/latest
    commands: [cat data/origin.txt]
  - name: b-by-workflow-tag
    provider: bash
    deps:
      - team/b/download:latest
    commands: [cat data/origin.txt]
  - name: never-ran
    provider: bash
    commands: ["true"]
  - name: needs-never-ran
    provider: bash
    deps:
      - :latest
      - never-ran
    commands: ["true"]
  - name: wrong-workflow-for-tag
    provider: bash
    deps:
      - never-ran:latest
    commands: ["true"]
"""


def git_project(root: Path, workflows: str, remote: str = "", files: dict[str, str] | None = None) -> Path:
    write_project(root, "workflows:\n" + workflows, files)
    subprocess.run(["git", "-c", "init.defaultBranch=main", "init", "-q"], cwd=root, check=True)
    if remote:
        subprocess.run(["git", "remote", "add", "origin", remote], cwd=root, check=True)
    return root


def ok(cluster: Cluster, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    r = cluster.cli(*args, cwd=root, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def submitted(r: subprocess.CompletedProcess[str]) -> str:
    return search(r"(\S+) submitted", r.stderr).group(1)


def line_of(root: Path, text: str, after: str = "") -> int:
    """The line of .dstack/workflows.yaml where `text` is first written (after the line holding `after`)."""
    lines = (root / ".dstack" / "workflows.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if after in line) if after else 0
    return next(i for i, line in enumerate(lines) if i >= start and text in line) + 1


def test_every_2022_spelling_of_a_dependency_chains_two_steps(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    a = git_project(
        tmp_path / "a",
        PRODUCER.format(mark="a") + CONSUMERS,
        files={"main.sh": "echo main of a; cat lib/x.txt\n", "lib/x.txt": "lib of a\n"},
    )
    b = git_project(tmp_path / "b", PRODUCER.format(mark="b"), remote=B_REMOTE)

    # no done run of `download` yet: `deps: [download]` is refused at its line, nothing is submitted
    before = len(cluster.runs())
    r = cluster.cli("run", "by-workflow", cwd=a)
    assert r.returncode == 2, r.stderr
    line = line_of(a, "- download", after="name: by-workflow")
    assert search(rf"workflows\.yaml:{line}:\d+: no run of workflow 'download' has finished done", r.stderr)
    assert len(cluster.runs()) == before

    a_run = submitted(ok(cluster, a, "run", "download", "-t", "latest"))
    b_run = submitted(ok(cluster, b, "run", "download", "-t", "latest"))

    # step two, in each spelling of this repository's dependencies
    for workflow in ("by-workflow", "by-tag", "by-workflow-tag", "by-mapping-with-mount"):
        assert f"data of a from {a_run}" in ok(cluster, a, "run", workflow).stdout, workflow

    # the April 2022 object: `download` runs first in the same run; the included files are in the code sent
    r = ok(cluster, a, "run", "chain-object")
    chain = submitted(r)
    assert f"data of a from {chain}" in r.stdout and "main of a" in r.stdout and "lib of a" in r.stdout
    assert {j["name"] for j in cluster.run_info(chain)["jobs"]} == {"download", "chain-object"}

    # the second repository's runs, by OWNER/REPO in each string spelling
    for workflow in ("b-by-workflow", "b-by-tag", "b-by-workflow-tag"):
        assert f"data of b from {b_run}" in ok(cluster, a, "run", workflow).stdout, workflow

    # refusals name the line: a workflow with no done run (second item), a tag on another workflow's run
    before = len(cluster.runs())
    r = cluster.cli("run", "needs-never-ran", cwd=a)
    line = line_of(a, "- never-ran", after="name: needs-never-ran")
    assert r.returncode == 2, r.stderr
    assert search(rf"workflows\.yaml:{line}:\d+: no run of workflow 'never-ran'", r.stderr), r.stderr
    r = cluster.cli("run", "wrong-workflow-for-tag", cwd=a)
    line = line_of(a, "- never-ran:latest")
    assert r.returncode == 2, r.stderr
    assert search(rf"workflows\.yaml:{line}:\d+: tag 'latest' is on run \S+ of workflow 'download'", r.stderr)
    assert len(cluster.runs()) == before


def test_an_included_file_missing_from_the_code_is_refused_before_anything_starts(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.start_coordinator()
    a = git_project(tmp_path / "a", PRODUCER.format(mark="a") + CONSUMERS, files={"main.sh": "true\n"})
    (a / ".gitignore").write_text("lib/\n")
    (a / "lib").mkdir()
    (a / "lib" / "x.txt").write_text("ignored by git\n")
    r = cluster.cli("run", "chain-object", cwd=a)
    assert r.returncode == 2, r.stderr
    line = line_of(a, "include: [main.sh, lib]")
    assert search(rf"workflows\.yaml:{line}:\d+: depends-on.repo.include 'lib': it exists but is not sent", r.stderr)
    assert cluster.runs() == []


EARLY = f"""
  - name: download-model
    image: {BUSYBOX}
    commands:
      - mkdir -p models && echo "model $model" > models/m.txt
    artifacts:
      - models
  - name: encode-dataset
    template:
      image: {BUSYBOX}
      commands:
        - mkdir -p datasets && cat models/m.txt encode.txt > datasets/input.txt
      artifacts:
        - datasets
    depends-on:
      repo:
        include:
          - encode.txt
      workflows:
        - download-model
  - name: finetune-model
    image: {BUSYBOX}
    commands:
      - cat datasets/input.txt
      - echo "run=$run_name job=$job_id env=$MODEL" args $variables_as_args
    depends-on:
      - download-model
      - encode-dataset
"""
VARIABLES = """variables:
  global:
    model: 124M
  finetune-model:
    batch_size: 1
    prompt: hello world
"""


def test_the_early_2022_syntax_runs_to_done_in_a_container(cluster: Cluster, dockerd: Dockerd, tmp_path: Path) -> None:
    cluster.start_coordinator()
    docker_agent(cluster, dockerd)
    project = git_project(tmp_path / "gpt", EARLY, files={"encode.txt": "encoded text\n"})
    (project / ".dstack" / "variables.yaml").write_text(VARIABLES)

    r = ok(cluster, project, "run", "finetune-model", "--model", "117M")
    run = submitted(r)
    assert "finetune-model | model 117M" in r.stdout and "finetune-model | encoded text" in r.stdout
    job_id = next(j["id"] for j in cluster.run_info(run)["jobs"] if j["name"] == "finetune-model")
    assert f"run={run} job={job_id} env=117M args --batch_size 1 --prompt hello world" in r.stdout
    assert {j["status"] for j in cluster.run_info(run)["jobs"]} == {"done"}
    # the deprecation notes name the line and today's spelling, once per workflow
    for what, at in (("download-model", "name: download-model"), ("encode-dataset", "template:")):
        note = f"workflows.yaml:{line_of(project, at)}:5: workflow '{what}' uses the early-2022 syntax"
        assert r.stderr.count(note) == 1, r.stderr
    for what in ("finetune-model",):
        note = f"workflows.yaml:{line_of(project, 'name: ' + what)}:5: workflow '{what}' uses the early-2022 syntax"
        assert r.stderr.count(note) == 1, r.stderr
    assert "write `provider: docker` and the fields without template:" in r.stderr
