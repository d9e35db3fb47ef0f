"""`dstack rerun` and `dstack diff` end to end (docs/reproducibility.md): the real CLI, coordinator and agents.

- `rerun --same-inputs` after the tag moved takes the old run's input (the job reads the old file); a rerun
  without it takes what the tag names now, and says so at submission; an input run that was removed since
  is a clear error, and a run an unfinished rerun takes as input cannot be removed meanwhile.
- A requirement that resolves differently now (a newer wheel published to the index between the runs) is
  reported when the rerun ends, with the other GPU model; `--pin` makes pip resolve the recorded version.
- `dstack diff` names a changed variable and a changed package; `--json` has the documented shape.
- A secret set again since the old run is reported (never its value).
- A viewer cannot rerun; a member reruns another member's run of a shared repository, not of their local
  one; an unknown run, and one still running, are clear errors.
- A dirty tree with untracked files reruns byte for byte: `dstack code` of both runs gives the same tree.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PY, Cluster, wait_for, write_project
from tests.integration.test_run_record import dirty_project, show, submitted, tree
from tests.tinywheel import build_wheel

pytestmark = pytest.mark.integration

TAGGED = """
workflows:
  - name: make
    provider: bash
    commands:
      - mkdir -p data && echo "content ${{ content }}" > data/x.txt
    artifacts: ["data"]
  - name: use
    provider: bash
    depends-on:
      - make:data
    commands:
      - cat data/x.txt
"""


def finished(cluster: Cluster, r: subprocess.CompletedProcess[str]) -> str:
    name = submitted(r)
    assert cluster.wait_status(name, {"done", "failed"}, timeout=180)["status"] == "done", cluster.cli(
        "logs", name
    ).stdout[-3000:]
    return name


def logs(cluster: Cluster, name: str) -> str:
    r = cluster.cli("logs", name)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_rerun_same_inputs_takes_the_old_input_after_the_tag_moved(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("a1")
    project = write_project(
        tmp_path / "p", TAGGED, {".dstack/variables.yaml": "variables:\n  make:\n    content: none\n"}
    )
    assert cluster.cli("secrets", "add", "API_KEY", "first-s3cr3t-value").returncode == 0
    first = finished(cluster, cluster.cli("run", "make", "--content", "v1", "-t", "data", "-d", cwd=project))
    used = finished(cluster, cluster.cli("run", "use", "-d", cwd=project))
    assert "content v1" in logs(cluster, used)
    second = finished(cluster, cluster.cli("run", "make", "--content", "v2", "-t", "data", "-d", cwd=project))
    wait_for(lambda: cluster.cli("tags", "list", "--json", cwd=project).stdout.count(second) == 1, what="tag moved")

    r = cluster.cli("diff", first, second, "--json")  # the variable that differs, and the file it made
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["workflows"] == {
        "make": {"variables": {"content": ["v1", "v2"]}, "workflow": d["workflows"]["make"]["workflow"]}
    }
    assert d["workflows"]["make"]["workflow"]["commands[0]"][1].endswith('echo "content v2" > data/x.txt')
    assert d["run"]["args"] == [["--content", "v1"], ["--content", "v2"]] and "code" not in d

    same = finished(cluster, cluster.cli("rerun", used, "--same-inputs", "-d"))
    assert "content v1" in logs(cluster, same)  # the file the old run read, though the tag is on v2 now
    record = show(cluster, same)
    assert record["rerun_of"]["run"] == used and record["rerun_of"]["same_inputs"] is True
    old_inputs = show(cluster, used)["jobs"][0]["inputs"]
    assert record["jobs"][0]["inputs"] == old_inputs and old_inputs[0]["run"] == first

    # The secret is set again: the rerun says its value may differ, and prints neither value.
    assert cluster.cli("secrets", "add", "API_KEY", "second-s3cr3t-value").returncode == 0
    r = cluster.cli("rerun", used, "-d")
    assert f"tag data now names run {second}" in r.stderr, r.stderr
    assert f"secret API_KEY was set again after run {used} ran" in r.stderr, r.stderr
    assert "s3cr3t" not in r.stderr + r.stdout
    current = finished(cluster, r)
    assert "content v2" in logs(cluster, current)
    assert show(cluster, current)["jobs"][0]["inputs"][0]["run"] == second

    # While a rerun that takes `first` as its input waits (no agent), `first` cannot be removed.
    cluster.agents[0].terminate()
    wait_for(lambda: all(a["status"] != "online" for a in cluster.agents_json()), timeout=60, what="agent gone")
    waiting = submitted(cluster.cli("rerun", used, "--same-inputs", "-d"))
    r = cluster.cli("rm", first)
    assert r.returncode != 0 and f"is an input of run {waiting}" in r.stderr, r.stderr
    assert cluster.cli("stop", waiting).returncode == 0
    cluster.wait_status(waiting, {"stopped", "failed"}, timeout=60)
    # Removed for good: the same inputs cannot be had, and the rerun says why.
    r = cluster.cli("rm", first)
    assert r.returncode == 0, r.stderr
    r = cluster.cli("rerun", used, "--same-inputs", "-d")
    assert r.returncode != 0 and "was deleted" in r.stderr and "without --same-inputs" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


TRAIN = """
workflows:
  - name: train
    provider: python
    file: train.py
    requirements: requirements.txt
    resources:
      gpu: 1
"""
TRAIN_PY = """
import os, tinypkg
print("tinypkg says", tinypkg.VALUE, "lr", os.environ["LR"])
"""


@pytest.mark.long  # four python jobs that make venvs: about a minute alone, minutes on a busy machine
def test_rerun_reports_a_requirement_that_resolves_differently_and_pin_keeps_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    index = tmp_path / "index"  # outside the code: publishing a wheel there does not change the code's hash
    build_wheel(index, version="1.0", value="one")
    cluster.start_coordinator()
    a1 = cluster.start_agent("a1", "--simulate-gpus", "1xA100-80GB")
    project = write_project(
        tmp_path / "p",
        TRAIN,
        {
            "train.py": TRAIN_PY,
            "requirements.txt": f"--no-index\n--find-links {index}\ntinypkg\n",
            ".dstack/variables.yaml": "variables:\n  train:\n    lr: 0.1\n",
        },
    )
    old = finished(cluster, cluster.cli("run", "train", "-d", cwd=project))
    assert "tinypkg says one lr 0.1" in logs(cluster, old)

    # A newer tinypkg is published, and the A100 box is replaced by an H100 one (with an empty env cache).
    build_wheel(index, version="2.0", value="two")
    a1.terminate()
    cluster.start_agent("a2", "--simulate-gpus", "1xH100-80GB")
    other = finished(cluster, cluster.cli("run", "train", "--lr", "0.2", "-d", cwd=project))

    # diff: the variable, the package and the GPU, readable and as JSON.
    r = cluster.cli("diff", old, other, "--json")
    assert r.returncode == 0, r.stderr
    d: dict[str, Any] = json.loads(r.stdout)
    assert d["version"] == "dstack.run-diff/v1" and d["runs"] == [old, other] and d["identical"] is False
    assert "code" not in d  # the same tree: nothing said about it
    assert d["run"]["args"] == [[], ["--lr", "0.2"]]
    assert [str(v) for v in d["workflows"]["train"]["variables"]["lr"]] == ["0.1", "0.2"]
    (job,) = d["jobs"]
    assert job["workflow"] == "train" and job["index"] == 0 and job["job"] == ["train", "train"]
    assert job["packages"] == {"changed": {"tinypkg": ["1.0", "2.0"]}}
    gpus_old, gpus_new = job["environment"]["gpus"]
    assert "A100" in gpus_old[0] and "H100" in gpus_new[0] and "(simulated)" in gpus_new[0]
    assert job["agent"] == ["a1", "a2"] and "exit_code" not in job
    assert job["spec"]["env.LR"] == ["0.1", "0.2"]
    r = cluster.cli("diff", old, other)
    assert r.returncode == 0, r.stderr
    for text in ("variable lr", "0.1", "0.2", "package tinypkg", "1.0", "2.0", "H100"):
        assert text in r.stdout, r.stdout
    assert not any(line.split() == ["code"] for line in r.stdout.splitlines())  # equal sections are not printed
    if os.environ.get("DSTACK_DIFF_SAMPLE"):  # docs/reproducibility.md's sample
        Path(os.environ["DSTACK_DIFF_SAMPLE"]).write_text(r.stdout)

    # rerun follows the job, then says what it did not reproduce: the package, the GPU model.
    r = cluster.cli("rerun", old, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "tinypkg says two lr 0.1" in r.stdout  # the old run's variables; the newer package
    assert "package tinypkg resolved to 2.0, not the recorded 1.0" in r.stderr, r.stderr
    assert "gpus" in r.stderr and "H100" in r.stderr

    # --pin: pip is constrained to the recorded freeze (a new cached environment, not the 2.0 one).
    r = cluster.cli("rerun", old, "--pin", timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "pip constrained to the" in r.stderr
    assert "tinypkg says one lr 0.1" in r.stdout
    assert "package tinypkg" not in r.stderr, r.stderr
    pinned = submitted(r)
    record = show(cluster, pinned)
    assert "tinypkg==1.0" in record["jobs"][0]["environment"]["packages"].splitlines()
    assert record["rerun_of"] == {"run": old, "same_inputs": False, "pin": True, "notes": record["rerun_of"]["notes"]}


def as_user(cluster: Cluster, token: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "dstack.cli", *args],
        capture_output=True,
        text=True,
        env={**cluster.env(), "DSTACK_TOKEN": token, "DSTACK_HOME": str(cluster.tmp / f"home-{token[:6]}")},
        cwd=cwd or cluster.tmp,
        timeout=120,
    )


def add_user(cluster: Cluster, name: str, role: str) -> str:
    r = cluster.cli("users", "add", name, "--role", role)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()[1]


def test_a_dirty_tree_reruns_byte_for_byte_and_who_may_rerun(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("a1")
    project = dirty_project(tmp_path / "p")  # a git remote: the repository github.com/org/repo, shared
    old = finished(cluster, cluster.cli("run", "look", "-d", cwd=project))
    # The working tree changes afterwards: a rerun must not pack it again.
    (project / "train.py").write_text("print('v3, later')\n")
    (project / "new-untracked.txt").write_text("not in the old run\n")

    member = add_user(cluster, "mia", "member")
    viewer = add_user(cluster, "vic", "viewer")
    r = as_user(cluster, viewer, "rerun", old, "-d")
    assert r.returncode != 0 and "member" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = as_user(cluster, member, "rerun", old, "-d")  # another member's run of a shared repository
    new = finished(cluster, r)
    assert show(cluster, new)["run"]["owner"] == "mia"

    out_old, out_new = tmp_path / "old", tmp_path / "new"
    assert cluster.cli("code", old, "-o", str(out_old)).returncode == 0
    assert cluster.cli("code", new, "-o", str(out_new)).returncode == 0
    assert tree(out_new) == tree(out_old)  # contents, exec bits, links, untracked files
    assert (out_new / "train.py").read_bytes() == b"print('v2, not committed')\n"  # not the later v3
    old_record, new_record = show(cluster, old), show(cluster, new)
    assert new_record["code"] == old_record["code"]
    assert new_record["resolved_workflow"] == old_record["resolved_workflow"]
    assert new_record["jobs"][0]["spec"] == old_record["jobs"][0]["spec"]
    r = cluster.cli("diff", old, new, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert "code" not in d and "workflows" not in d and d["identical"] is True
    assert d["run"] == {"owner": ["admin", "mia"]}

    # The later tree, run: diff names the files that differ, and --code shows how.
    later = finished(cluster, cluster.cli("run", "look", "-d", cwd=project))
    r = cluster.cli("diff", old, later, "--json", "--code")
    assert r.returncode == 0, r.stderr
    code = json.loads(r.stdout)["code"]
    assert code["files"] == {"added": ["new-untracked.txt"], "changed": ["train.py"]}
    assert code["untracked"] == {"added": ["new-untracked.txt"], "removed": []}
    assert "-print('v2, not committed')\n+print('v3, later')\n" in code["unified_diff"]
    r = cluster.cli("diff", old, later)
    assert r.returncode == 0 and "train.py" in r.stdout and "new-untracked.txt" in r.stdout, r.stdout

    # Another user's local repository (no remote) is theirs: a member cannot rerun into it.
    local = write_project(tmp_path / "local", "workflows:\n  - name: hi\n    provider: bash\n    commands: [echo hi]\n")
    mine = finished(cluster, cluster.cli("run", "hi", "-d", cwd=local))
    r = as_user(cluster, member, "rerun", mine, "-d")
    assert r.returncode != 0 and "local repository local/admin/local" in r.stderr, r.stderr

    # An unknown run; a run still running.
    r = cluster.cli("rerun", "no-such-run-1", "-d")
    assert r.returncode != 0 and "no-such-run-1" in r.stderr and "Traceback" not in r.stderr, r.stderr
    slow_project = write_project(
        tmp_path / "slow", "workflows:\n  - name: slow\n    provider: bash\n    commands: [sleep 600]\n"
    )
    slow = submitted(cluster.cli("run", "slow", "-d", cwd=slow_project))
    cluster.wait_status(slow, {"running"}, timeout=120)
    r = cluster.cli("rerun", slow, "-d")
    assert r.returncode != 0 and "has not finished" in r.stderr and f"dstack stop {slow}" in r.stderr, r.stderr
    assert cluster.cli("stop", slow).returncode == 0
