"""The run record's bounds (coordinator/records.py), the agent's reading of a job's report
(agent/environment.py) and the CLI's packing of the uncommitted diff apart (cli/packing.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from dstack.agent.environment import MAX_REPORT_BYTES, EnvironmentRecorder, read_report_file
from dstack.cli.packing import pack
from dstack.coordinator.app.runs import Submission
from dstack.coordinator.errors import InvalidRequest
from dstack.coordinator.model import CodeRef
from dstack.coordinator.records import (
    MAX_RESOLVED_WORKFLOW,
    clean,
    environment_record,
    manifest_hash,
    submission_record,
)


def test_clean_strips_terminal_controls_and_cuts() -> None:
    assert clean("a\x1b[2Jb\x07c\u202ed\r\ne", 100) == ("a[2Jbcd e", False)
    assert clean("x" * 10, 4) == ("xxxx", True)
    assert clean("l1\nl2\tz", 100, keep_newlines=True) == ("l1\nl2\tz", False)
    # A megabyte is not scanned whole to keep 8 characters.
    assert clean("\x1b" * (1 << 20), 8) == ("", True)


def test_environment_record_bounds_every_field() -> None:
    env = environment_record(
        runtime="host",
        image="i" * 5000,
        image_id="",
        image_digests=["d"] * 100,
        python_version="3.11.7",
        os="Linux",
        packages="p==1\n" * 100_000,
        packages_truncated=False,
        phase_ns={"running": -1, "code": 1 << 70, "bogus": 3},
        agent_version="0.1.0",
        gpus=[{"index": -3, "name": "\x1b[5mH100", "uuid": "u", "memory_total_bytes": -1}] * 100,
        driver_version="535",
        cuda_version="12.4",
    )
    assert len(env["image"]) == 512 and len(env["image_digests"]) == 16
    assert env["packages_truncated"] and len(env["packages"]) == 256 * 1024
    assert env["phase_ns"] == {"code": 10 * 365 * 24 * 3600 * 10**9, "running": 0}
    assert len(env["gpus"]) == 64 and env["gpus"][0] == {
        "index": 0,
        "name": "[5mH100",
        "uuid": "u",
        "memory_total_bytes": 0,
        "simulated": False,
    }
    assert env["truncated"] is True


def test_a_submission_with_an_oversized_or_malformed_workflow_is_refused() -> None:
    def sub(resolved: str, untracked: tuple[str, ...] = ()) -> Submission:
        return Submission("w", [], CodeRef(untracked=untracked), resolved_workflow=resolved)

    assert submission_record(sub('{"w": {"variables": {"a": 1}}}'))["resolved_workflow"] == {
        "w": {"variables": {"a": 1}}
    }
    with pytest.raises(InvalidRequest, match="at most"):
        submission_record(sub(json.dumps({"x": "y" * MAX_RESOLVED_WORKFLOW})))
    with pytest.raises(InvalidRequest, match="not JSON"):
        submission_record(sub("{nope"))
    with pytest.raises(InvalidRequest, match="JSON object"):
        submission_record(sub("[1, 2]"))
    with pytest.raises(InvalidRequest, match="untracked"):
        submission_record(sub("", untracked=("a",) * 10_001))


def test_the_agent_reads_no_link_no_fifo_and_nothing_oversized(tmp_path: Path) -> None:
    secret = tmp_path / "agent.json"
    secret.write_text('{"python_version": "STOLEN"}')
    link = tmp_path / "link.json"
    link.symlink_to(secret)
    assert read_report_file(link) is None
    hard = tmp_path / "hard.json"
    os.link(secret, hard)
    assert read_report_file(hard) is None
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    assert read_report_file(fifo) is None  # O_NONBLOCK: a fifo with no writer does not hang the agent
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"packages": "x" * MAX_REPORT_BYTES}))
    assert read_report_file(big) is None
    not_object = tmp_path / "list.json"
    not_object.write_text("[1]")
    assert read_report_file(not_object) is None

    workdir = tmp_path / "job"
    workdir.mkdir()
    (workdir / ".dstack-env-report.json").write_text(
        json.dumps({"python_version": "3.11.7", "packages": "a==1\n", "setup_ns": 5, "os": "Linux"})
    )
    rec = EnvironmentRecorder("host")
    rec.add_time("running", 10)
    rec.read_report(workdir)
    assert rec.env.python_version == "3.11.7" and rec.env.packages == "a==1\n"
    assert dict(rec.env.phase_ns) == {"running": 5, "environment": 5}
    assert not (workdir / ".dstack-env-report.json").exists()  # never an artifact of the job


def test_manifest_hash_is_of_the_files_not_their_order() -> None:
    a = manifest_hash([("b", 1, "h1"), ("a", 2, "h2")])
    assert a == manifest_hash([("a", 2, "h2"), ("b", 1, "h1")])
    assert a != manifest_hash([("a", 2, "h2"), ("b", 1, "h3")])


def git(root: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@e", *args], cwd=root, check=True, capture_output=True
    )


def test_pack_keeps_the_diff_and_the_untracked_files_apart(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("one\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "c")
    clean_pack = pack(tmp_path)
    assert clean_pack.diff == b"" and not clean_pack.ref.diff_hash and list(clean_pack.ref.untracked) == []
    (tmp_path / "a.py").write_text("two\n")
    (tmp_path / "new.txt").write_text("n\n")
    (tmp_path / ".env").write_text("TOKEN=x\n")  # left out of the tree, so not listed as sent
    packed = pack(tmp_path)
    assert b"-one\n+two\n" in packed.diff and packed.ref.diff_size == len(packed.diff)
    assert list(packed.ref.untracked) == ["new.txt"]
