"""`dstack validate [WORKFLOW] [--json]` (issue 13 item 11): the real CLI on scratch projects.

Every workflow file is checked as `dstack run` checks it before it connects, nothing is submitted and no coordinator
is contacted (a listening socket set as the coordinator must see no connection)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import write_project

GOOD_AND_BAD = """\
workflows:
  - name: hello
    provider: bash
    commands:
      - echo hi
  - name: typo
    provider: bash
    comands:
      - echo hi
  - name: train
    provider: python
    file: train.py
    env:
      - VALIDATE13_NOT_SET
  - name: missing-script
    provider: python
    python_script: nowhere.py
"""


def _cli(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DSTACK_", "VALIDATE13_"))}
    base |= {"DSTACK_HOME": str(root / ".home"), "GIT_CONFIG_GLOBAL": str(root / ".gitconfig")}
    return subprocess.run(
        [sys.executable, "-m", "dstack.cli", "validate", *args],
        cwd=root,
        env=base | (env or {}),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _json(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def test_every_workflow_ok_or_its_error_at_its_line(tmp_path: Path) -> None:
    write_project(tmp_path, GOOD_AND_BAD, {"train.py": "print(1)\n"})
    r = _cli(tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("ok") and "hello" in line and ".dstack/workflows.yaml:2" in line for line in lines)
    assert any(line.startswith("ok") and "train" in line for line in lines)
    assert any("typo" in line and ".dstack/workflows.yaml:8:5: unknown field 'comands'" in line for line in lines)
    assert any("missing-script" in line and ":17:20: python_script 'nowhere.py'" in line for line in lines), lines
    # A note is shown with the workflow it came from, not as an error.
    assert any("train" in line and "VALIDATE13_NOT_SET" in line and "note:" in line for line in lines)
    assert "4 workflows: 2 ok, 2 with errors" in r.stdout
    assert str(tmp_path) not in r.stdout  # paths relative to the project, as a CI log shows them


def test_json_for_ci(tmp_path: Path) -> None:
    write_project(tmp_path, GOOD_AND_BAD, {"train.py": "print(1)\n"})
    out = _json(_cli(tmp_path, "--json"))
    assert out["ok"] is False
    by_name = {w["name"]: w for w in out["workflows"]}
    assert by_name["hello"] == {
        "name": "hello",
        "file": ".dstack/workflows.yaml",
        "line": 2,
        "ok": True,
        "errors": [],
        "notes": [],
    }
    [error] = by_name["typo"]["errors"]
    assert (error["file"], error["line"], error["column"]) == (".dstack/workflows.yaml", 8, 5)
    assert "comands" in error["message"]
    assert by_name["train"]["ok"] and "VALIDATE13_NOT_SET" in by_name["train"]["notes"][0]


def test_a_broken_file_does_not_hide_the_others(tmp_path: Path) -> None:
    """Invalid YAML in one file and a nameless entry in another: both reported at their lines, and the workflows
    that can be read are still checked (`dstack run` stops at the first; CI wants them all)."""
    write_project(
        tmp_path,
        "workflows:\n  - name: a\n    provider: bash\n    commands: [echo a]\n  - provider: bash\n",
        {
            ".dstack/workflows/broken.yaml": "workflows:\n  - name: b\n    provider: [bash\n",
            ".dstack/workflows/c.yaml": "workflows:\n  - name: c\n    provider: bash\n    commands: [echo c]\n",
        },
    )
    r = _cli(tmp_path, "--json")
    assert r.returncode == 1
    out = _json(r)
    where = {(e["file"], e["line"]) for e in out["file_errors"]}
    assert (".dstack/workflows.yaml", 5) in where
    assert any(f == ".dstack/workflows/broken.yaml" for f, _ in where)
    assert {w["name"]: w["ok"] for w in out["workflows"]} == {"a": True, "c": True}


def test_one_workflow_only(tmp_path: Path) -> None:
    write_project(tmp_path, GOOD_AND_BAD, {"train.py": "print(1)\n"})
    r = _cli(tmp_path, "hello")
    assert r.returncode == 0, r.stdout
    assert "typo" not in r.stdout and "1 workflow: 1 ok" in r.stdout
    r = _cli(tmp_path, "nope")
    assert r.returncode == 1 and "workflow 'nope' is not defined" in r.stdout


def test_all_ok_exits_zero(tmp_path: Path) -> None:
    write_project(tmp_path, "workflows:\n  - name: a\n    provider: bash\n    commands: [echo a]\n")
    r = _cli(tmp_path)
    assert r.returncode == 0 and "1 workflow: 1 ok" in r.stdout, r.stdout + r.stderr


def test_no_coordinator_is_contacted(tmp_path: Path) -> None:
    """A coordinator address and token set: validate still connects to nothing (a CI job has no token, and must
    never upload code or submit a run), and runs none of the workflow's commands."""
    marker = tmp_path / "ran"
    write_project(
        tmp_path,
        f"workflows:\n  - name: a\n    provider: bash\n    before_run: [touch {marker}]\n"
        f"    commands: [touch {marker}]\n",
    )
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        r = _cli(tmp_path, env={"DSTACK_COORDINATOR": f"127.0.0.1:{port}", "DSTACK_TOKEN": "t"})
        assert r.returncode == 0, r.stdout + r.stderr
        try:
            listener.accept()
            connected = True
        except BlockingIOError:
            connected = False
    assert not connected
    assert not marker.exists()  # nothing of the workflow runs either


def test_a_provider_repository_is_fetched_never_run(tmp_path: Path) -> None:
    """A custom provider from a file:// repository is read (cached); a hook in it never runs, and an `ext::` URL,
    which would run a command, is refused at its line."""
    repo = tmp_path / "providers"
    repo.mkdir()
    marker = tmp_path / "hook-ran"
    (repo / ".dstack").mkdir()
    (repo / ".dstack" / "providers.yaml").write_text(
        "providers:\n  - name: hello\n    image: python:3.11\n    commands: [python3 main.py]\n"
    )
    (repo / "main.py").write_text("print('hi')\n")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q", "-b", "main", str(repo)], check=True)
    hook = repo / ".git" / "hooks" / "post-checkout"
    hook.write_text(f"#!/bin/sh\ntouch {marker}\n")
    hook.chmod(0o755)
    subprocess.run([*git, "-C", str(repo), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "p"], check=True)
    project = tmp_path / "project"
    write_project(
        project,
        f"""\
        workflows:
          - name: custom
            provider:
              name: hello
              repo: file://{repo}
          - name: evil
            provider:
              name: hello
              repo: "ext::sh -c touch% {marker}"
        """,
    )
    out = _json(_cli(project, "--json"))
    by_name = {w["name"]: w for w in out["workflows"]}
    assert by_name["custom"]["ok"], by_name["custom"]
    [error] = by_name["evil"]["errors"]
    assert error["line"] == 9 and "only file, git, http(s) and ssh" in error["message"]
    assert not marker.exists()


def test_validate_lists_exactly_the_files_run_would_send(tmp_path: Path, monkeypatch: Any) -> None:
    """validate checks named files against `list_code` (names only, nothing read): the same files `pack_code`
    packs, artifact folders and untracked credentials left out alike."""
    from dstack.cli.commands.run import list_code, pack_code

    monkeypatch.setenv("DSTACK_HOME", str(tmp_path / "home"))
    project = write_project(
        tmp_path / "p",
        "workflows:\n  - name: a\n    provider: python\n    file: .env\n    artifacts: [model]\n",
        {"train.py": "", ".env": "TOKEN=x\n", "model/weights.bin": "w", "src/lib.py": ""},
    )
    listed, packed = list_code(project), pack_code(project)
    assert listed.names == packed.names and listed.left_out == packed.left_out == ["model"]
    assert listed.credentials_left_out == packed.credentials_left_out == [".env"]
    r = _cli(project, "--json")
    [error] = _json(r)["workflows"][0]["errors"]
    assert "'.env': it exists but is not sent with the code" in error["message"]


# --- the decisions of docs/workflows-2022.md ("Decisions on forms 2022 files use that issue 13 does not name") ---


def _check(tmp_path: Path, workflows: str) -> dict[str, Any]:
    write_project(tmp_path, workflows)
    return _json(_cli(tmp_path, "--json"))


def test_an_empty_duplicate_key_gives_way_with_a_note(tmp_path: Path) -> None:
    out = _check(
        tmp_path,
        "workflows:\n  - name: a\n    provider: bash\n    commands: [ls]\n    artifacts:\n    artifacts: [x]\n",
    )
    assert out["ok"], out
    assert any(":6:5: 'artifacts' is written twice; the empty one at line 5 is ignored" in n for n in out["notes"])


def test_a_duplicate_key_with_two_values_is_refused_at_the_second(tmp_path: Path) -> None:
    out = _check(
        tmp_path, "workflows:\n  - name: a\n    provider: bash\n    commands: [rm -rf x]\n    commands: [ls]\n"
    )
    [error] = out["file_errors"]
    assert (error["line"], error["column"]) == (5, 5)
    assert error["message"] == "duplicate key 'commands' (first at line 4); keep one"


def test_top_level_gpu_is_ignored_with_a_note_and_must_be_a_number(tmp_path: Path) -> None:
    out = _check(tmp_path, "workflows:\n  - name: a\n    provider: bash\n    commands: [ls]\n    gpu: 1\n")
    [w] = out["workflows"]
    assert w["ok"] and "a top-level 'gpu' is ignored" in w["notes"][0] and ":5:10:" in w["notes"][0]
    out = _check(tmp_path, "workflows:\n  - name: a\n    provider: bash\n    commands: [ls]\n    gpu: lots\n")
    [error] = out["workflows"][0]["errors"]
    assert error["line"] == 5 and "'gpu' must be a whole number" in error["message"]


def test_resources_local_is_ignored_with_a_note_and_must_be_a_boolean(tmp_path: Path) -> None:
    base = "workflows:\n  - name: a\n    provider: bash\n    commands: [ls]\n    resources:\n"
    out = _check(tmp_path, base + "      local: true\n")
    assert out["ok"] and "resources.local (2022: where the run goes) is ignored" in out["workflows"][0]["notes"][0]
    out = _check(tmp_path, base + "      remote: maybe\n")
    [error] = out["workflows"][0]["errors"]
    assert error["line"] == 6 and error["message"] == "'remote' must be true or false"


def test_a_bare_provider_branch_is_refused_saying_where_a_branch_comes_from(tmp_path: Path) -> None:
    """A branch of a built-in (2022: a developer build from dstackai/dstack's branch) is not available; a branch of
    any other name can only come from a provider repository, and the error says how to name one."""
    out = _check(tmp_path, "workflows:\n  - name: a\n    provider: bash@main\n    commands: [ls]\n")
    [error] = out["workflows"][0]["errors"]
    assert error["line"] == 3 and error["message"] == "provider 'bash@main' is not available yet"
    out = _check(tmp_path, "workflows:\n  - name: a\n    provider: mine@dev\n")
    [error] = out["workflows"][0]["errors"]
    assert error["line"] == 3
    assert error["message"] == (
        "provider 'mine@dev': a branch is read only from a provider repository"
        " (`provider: {name: mine@dev, repo: URL}`)"
    )
