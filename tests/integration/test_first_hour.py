"""A new user's first hour (issue 9): local mode that never wedges, a run that says why it waits, a checked
`dstack config`, `artifacts upload` paths, `dstack stop`'s answer, and mistakes caught before submitting."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dstack.tls import fingerprint
from tests.conftest import PY, Cluster, LocalMode, free_port, search, wait_for, write_project

pytestmark = pytest.mark.integration


def no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr + r.stdout


HELLO = """
workflows:
  - name: hello
    help: "Prints a greeting"
    provider: bash
    commands: ["echo hello"]
"""


# ---- 1. local mode after `dstack local stop` ------------------------------------------------------------


def test_local_mode_runs_again_after_local_stop(local: LocalMode, tmp_path: Path) -> None:
    """The test environment's install is editable, as the README's: the agent's own state folder `agent/`
    in the local services' directory once shadowed the `agent` package after a restart."""
    project = write_project(tmp_path / "p", HELLO)
    first = local.cli("run", "hello", cwd=project)
    assert first.returncode == 0, first.stderr
    assert "starting the local coordinator and agent" in first.stderr
    assert (local.home / "local" / "agent").is_dir()  # the folder that used to shadow the package
    assert local.cli("local", "stop", cwd=project).stdout.strip() == "stopped: agent, coordinator"
    for _ in range(2):  # started again, then reused
        again = local.cli("run", "hello", cwd=project, timeout=60)
        assert again.returncode == 0, again.stderr
        assert again.stdout == "hello\n"
    assert "ImportError" not in (local.home / "local" / "agent.log").read_text()


def test_a_local_agent_that_cannot_start_is_reported_with_its_log(local: LocalMode, tmp_path: Path) -> None:
    project = write_project(tmp_path / "p", HELLO)
    local.extra_env["DSTACK_RUNTIME"] = "no-such-runtime"  # the agent refuses it as it starts
    r = local.cli("run", "hello", cwd=project, timeout=60)
    assert r.returncode == 1
    assert re.search(r"the local agent exited \(code \d+\) as it started; the end of \S+agent.log:", r.stderr)
    assert "'no-such-runtime'" in r.stderr.split("agent.log:")[1]  # the end of the log says why
    assert "submitted" not in r.stderr
    no_traceback(r)


# ---- 2. `dstack run` says why its run waits ------------------------------------------------------------


def test_run_in_the_foreground_says_why_it_waits(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    project = write_project(tmp_path / "p", HELLO)
    proc = subprocess.Popen(
        [PY, "-m", "dstack.cli", "run", "hello"],
        cwd=project,
        env=cluster.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    stderr = proc.stderr
    assert stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(stderr.readline, "")), daemon=True)
    reader.start()
    try:
        waiting = wait_for(lambda: next((ln for ln in lines if ": pending: " in ln), None), what="the waiting line")
        name = search(r"(\S+) submitted", "".join(lines)).group(1)
        ps = cluster.run_info(name)
        # the same text as `dstack ps`: its STATUS and MESSAGE columns
        assert waiting.strip() == f"{name}: pending: {ps['message']}"
        assert ps["message"] == "waiting: no agent is online"
        cluster.start_agent()
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    reader.join(10)
    assert proc.returncode == 0
    assert out == "hello\n"
    assert sum(": pending: " in ln for ln in lines) == 1  # piped: one line per change, not per poll


# ---- 6. `dstack config` ---------------------------------------------------------------------------------


def test_config_checks_before_saving_and_never_falls_back_to_local(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    home = tmp_path / "home"
    env = {k: v for k, v in cluster.env().items() if k not in ("DSTACK_COORDINATOR", "DSTACK_TOKEN")}
    env["DSTACK_HOME"] = str(home)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PY, "-m", "dstack.cli", *args], capture_output=True, text=True, env=env, timeout=60)

    bad = cli("config", "--coordinator", cluster.address, "--token", "wrong")
    assert bad.returncode == 1
    assert f"the coordinator at {cluster.address} refused the token" in bad.stderr
    assert "nothing was saved" in bad.stderr
    assert not (home / "config.yaml").exists()
    shown = cli("config")
    assert shown.stdout.startswith("coordinator: local (embedded")

    good = cli("config", "--coordinator", cluster.address, "--token", cluster.admin_token)
    assert good.returncode == 0, good.stderr
    shown = cli("config")
    assert shown.stdout.splitlines() == [
        f"coordinator: {cluster.address} (from {home / 'config.yaml'})",
        f"transport: TLS, CA pinned in {home / 'coordinator-ca.pem'} ({fingerprint(cluster.ca_file.read_bytes())})",
        "user: admin",
    ]

    assert cluster.coordinator is not None
    cluster.coordinator.terminate()
    for args in (["ps"], ["config"]):
        r = cli(*args)
        assert r.returncode == 1
        assert f"cannot reach the coordinator at {cluster.address}" in r.stderr
        no_traceback(r)
    assert not (home / "local").exists()  # no local services were started in its place

    saved = cli("config", "--coordinator", cluster.address, "--token", "t", "--no-check")
    assert saved.returncode == 0 and "without checking" in saved.stdout


# ---- 7. `artifacts upload` keeps paths relative to the folder -------------------------------------------


def test_upload_publishes_the_folders_contents_at_their_own_paths(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    root = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: download
            provider: bash
            commands: ["true"]
            artifacts: ["data"]
          - name: train
            provider: bash
            depends-on: ["download:ds"]
            commands: ["cat data/dataset.csv"]
        """,
        {"updata/data/dataset.csv": "x,y\n1,2\n", "flat/dataset.csv": "x,y\n5,6\n"},
    )
    r = cluster.cli("artifacts", "upload", "updata", "-t", "ds", "-w", "download", cwd=root)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr
    r = cluster.cli("run", "train", cwd=root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\nx,y\n1,2\n")

    # A folder whose files are not under the workflow's artifact folder: a warning that says what to do.
    r = cluster.cli("artifacts", "upload", "flat", "-t", "flat", "-w", "download", cwd=root)
    assert r.returncode == 0, r.stderr
    assert "not under it (e.g. dataset.csv): `--prefix` puts them under a folder" in r.stderr
    r = cluster.cli("artifacts", "upload", "flat", "-t", "flat2", "-w", "download", "--prefix", "data", cwd=root)
    assert r.returncode == 0 and "warning" not in r.stderr
    run = json.loads(cluster.cli("tags", "list", "--json", cwd=root).stdout)
    flat2 = next(t["run"] for t in run if t["name"] == "flat2")
    listed = json.loads(cluster.cli("artifacts", "list", flat2, "--json").stdout)
    assert [f["path"] for f in listed] == ["data/dataset.csv"]
    r = cluster.cli("artifacts", "upload", "flat", "-t", "x", "--prefix", "../up", cwd=root)
    assert r.returncode == 1 and "--prefix '../up' must be a relative path" in r.stderr


# ---- 9. `dstack stop` says how the run ended -----------------------------------------------------------


def test_stop_prints_the_status_after_the_stop(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: sleepy
            provider: bash
            commands: ["echo ready", "sleep 1000"]
        """,
    )
    r = cluster.cli("run", "-d", "sleepy", cwd=project)
    name = r.stdout.strip()
    wait_for(lambda: "ready" in cluster.cli("logs", name).stdout, what="the job to start")
    r = cluster.cli("stop", name)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{name}: stopped\n"


# ---- 10. mistakes caught before anything is submitted ---------------------------------------------------


@pytest.fixture
def nowhere(tmp_path: Path) -> dict[str, str]:
    """A CLI environment whose coordinator does not exist: an error must come before any connection."""
    return {
        **os.environ,
        "DSTACK_HOME": str(tmp_path / "home"),
        "DSTACK_COORDINATOR": f"127.0.0.1:{free_port()}",
        "DSTACK_TOKEN": "x",
    }


def _run(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "dstack.cli", "run", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60
    )


def test_a_file_the_workflow_names_must_be_in_the_code(nowhere: dict[str, str], tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: train
            provider: python
            file: nope.py
          - name: ignored
            provider: python
            file: secret.py
          - name: reqs
            provider: python
            working_dir: src
            file: main.py
            requirements: requirements.txt
        """,
        {".gitignore": "secret.py\n", "secret.py": "print(1)\n", "src/main.py": "print(1)\n"},
    )
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    r = _run(nowhere, project, "train")
    assert r.returncode == 2
    assert "workflows.yaml:5:" in r.stderr and "file 'nope.py': there is no such file in the project" in r.stderr
    r = _run(nowhere, project, "ignored")
    assert r.returncode == 2 and "file 'secret.py': it exists but is not sent with the code" in r.stderr
    r = _run(nowhere, project, "reqs")
    assert r.returncode == 2 and "requirements 'src/requirements.txt': there is no such file" in r.stderr
    no_traceback(r)


def test_an_option_that_is_not_a_variable_is_refused(nowhere: dict[str, str], tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: hello
            provider: bash
            commands: ["echo hi"]
          - name: train
            provider: python
            file: train.py
          - name: echo
            provider: bash
            commands: ["echo ${{ run.args }}"]
        """,
        {
            "train.py": "print(1)\n",
            ".dstack/variables.yaml": "variables:\n  train:\n    batch-size: 32\n",
        },
    )
    r = _run(nowhere, project, "hello", "--batch-size", "3")
    assert r.returncode == 2
    assert "workflow 'hello' takes no arguments, and '--batch-size' is not one of its variables" in r.stderr
    r = _run(nowhere, project, "train", "--batch_size", "3")
    assert r.returncode == 2
    assert "'--batch_size' is not a variable of workflow 'train'; did you mean --batch-size?" in r.stderr
    no_traceback(r)
    # What is meant for the script passes: after `--`, or an option that resembles no variable. These get as
    # far as connecting to the (absent) coordinator, so no workflow error was raised.
    for args in (["train", "--", "--batch_size", "3"], ["train", "--lr", "0.1"], ["echo", "--anything"]):
        r = _run(nowhere, project, *args)
        assert "cannot reach the coordinator" in r.stderr, (args, r.stderr)


# ---- 12. smaller papercuts ------------------------------------------------------------------------------


def test_run_without_a_workflow_lists_them(nowhere: dict[str, str], tmp_path: Path) -> None:
    project = write_project(tmp_path / "p", HELLO)
    r = _run(nowhere, project)
    assert r.returncode == 2
    assert r.stderr == (
        "error: missing the workflow to run. Usage: dstack run WORKFLOW [ARGS]..., one of:\n"
        "  hello  Prints a greeting\n"
    )


def test_downloaded_artifact_folders_are_not_packed_again(local: LocalMode, tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: train
            provider: bash
            commands: ["mkdir -p model", "echo w > model/w.bin", "ls"]
            artifacts: ["model"]
        """,
    )
    first = local.cli("run", "train", cwd=project)
    assert first.returncode == 0, first.stderr
    assert "code: 1 file," in first.stderr  # singular
    name = search(r"(\S+) submitted", first.stderr).group(1)
    assert local.cli("artifacts", "download", name, cwd=project).returncode == 0
    assert (project / "model" / "w.bin").exists()
    second = local.cli("run", "train", cwd=project)
    assert second.returncode == 0, second.stderr
    assert "left out artifact folders model/" in second.stderr
    assert "uploaded" not in second.stderr  # the same code as before: model/ was not packed


def test_the_example_loss_goes_down_every_epoch(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "hello" / "train.py"
    r = subprocess.run(
        [sys.executable, str(example), "--epochs", "4"], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert r.returncode == 0, r.stderr
    losses = [float(x) for x in re.findall(r"loss=([0-9.]+)", r.stdout)]
    assert len(losses) == 4 and all(b < a for a, b in itertools.pairwise(losses))
