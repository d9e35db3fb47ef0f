"""`dstack rerun --pin` (coordinator/app/rerun.py) and `dstack diff` (cli/run_diff.py) on records made here.

The pins come from what an agent reported, which is not trusted: a hostile `pip freeze` line or image
digest must not become a shell command, another registry or a malformed reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dstack.cli.commands.rerun import tree_changes
from dstack.cli.run_diff import diff_records, package_changes, reproduction_gaps
from dstack.coordinator.app.rerun import CONSTRAINTS_ENV, PIN_COMMAND, _constraints, _image_pin, _pin
from dstack.coordinator.convert import job_spec_from_proto
from dstack.protos.v1 import common_pb2

GOOD = "sha256:" + "a" * 64


def test_pin_takes_only_a_well_formed_digest_of_the_images_own_repository() -> None:
    env = {"image_digests": [f"evil.example/python@{GOOD}", "python@sha256:zz", f"python@{GOOD}"]}
    assert _image_pin("python:3.11-slim", env)[0] == f"python@{GOOD}"
    assert _image_pin("ghcr.io/org/img:1", {"image_digests": [f"docker.io/library/python@{GOOD}"]})[0] == ""
    pinned, note = _image_pin("busybox:1.36", {"image_digests": [f"evil.example/busybox@{GOOD}"], "image_id": "x"})
    assert pinned == "" and "runs by its tag" in note
    assert _image_pin(f"python@{GOOD}", env) == ("", "")  # already by digest


def test_constraints_keep_only_name_equals_version_lines() -> None:
    freeze = "\n".join(
        [
            "tinypkg==1.0",
            "-e git+https://example/x.git@abc#egg=x",
            "evil==1.0; rm -rf /",
            "$(touch /tmp/pwned)==1",
            "pkg @ file:///tmp/pkg.whl",
            "Torch==2.3.0+cu121",
        ]
    )
    text, kept, left = _constraints({"packages": freeze})
    assert text.splitlines() == ["tinypkg==1.0", "Torch==2.3.0+cu121"] and (kept, left) == (2, 4)
    huge = "".join(f"pkg{i}==1.0\n" for i in range(30_000))  # a hostile agent's quarter megabyte
    text, kept, left = _constraints({"packages": huge})
    assert len(text) <= 96 * 1024 and kept + left == 30_000 and text.endswith("==1.0")


def test_pin_passes_constraints_through_the_environment_not_the_command_line() -> None:
    proto = common_pb2.JobSpec(job_name="train", commands=["python train.py"])
    spec, notes = _pin(job_spec_from_proto(proto), {"environment": {"packages": "tinypkg==1.0\n'; echo x\n"}})
    pinned = common_pb2.JobSpec.FromString(spec.encoded)
    assert list(pinned.commands) == [PIN_COMMAND, "python train.py"] and "tinypkg" not in PIN_COMMAND
    assert pinned.env[CONSTRAINTS_ENV] == "tinypkg==1.0"
    assert any("1 recorded package version(s); 1 line(s) left out" in n for n in notes)
    untouched, notes = _pin(job_spec_from_proto(proto), {"environment": None})
    assert untouched.encoded == job_spec_from_proto(proto).encoded and "recorded no environment" in notes[0]


def record(name: str, **over: Any) -> dict[str, Any]:
    job = {
        "job_name": "train",
        "status": "done",
        "exit_code": 0,
        "agent": "a1",
        "spec": {"workflow": "train", "commands": ["python train.py"]},
        "inputs": [{"run": "data-run-1", "job": "prepare", "manifest_hash": "m1", "files": 1}],
        "environment": {"packages": "tinypkg==1.0\nnumpy==1.26.0\n", "gpus": [{"name": "A100", "simulated": False}]},
        "timings_s": {"running": 1.0},
    }
    job |= over.pop("job", {})
    base = {
        "version": "dstack.run-record/v1",
        "run": {"name": name, "workflow": "train", "owner": "admin", "args": []},
        "code": {"hash": "h1", "commit": "c1", "untracked": ["a.txt"]},
        "resolved_workflow": {"train": {"variables": {"lr": 0.1}, "workflow": {"commands": ["python train.py"]}}},
        "jobs": [job],
    }
    return base | over


def test_diff_names_only_what_differs_and_is_json() -> None:
    a = record("r1")
    b = record(
        "r2",
        run={"name": "r2", "workflow": "train", "owner": "mia", "args": []},
        code={"hash": "h1", "commit": "c1", "untracked": ["a.txt", "b.txt"]},
        resolved_workflow={"train": {"variables": {"lr": 0.2}, "workflow": {"commands": ["python train.py"]}}},
        job={
            "inputs": [{"run": "data-run-2", "job": "prepare", "manifest_hash": "m2", "files": 1}],
            "environment": {"packages": "tinypkg==2.0\nscipy==1.0\n", "gpus": [{"name": "H100"}]},
            "exit_code": 1,
            "timings_s": {"running": 2.0},
        },
    )
    d = diff_records(a, b)
    json.dumps(d)  # plain JSON
    assert d["run"] == {"owner": ["admin", "mia"]}
    assert d["code"] == {"untracked": {"added": ["b.txt"], "removed": []}}
    assert d["workflows"] == {"train": {"variables": {"lr": [0.1, 0.2]}}}
    (job,) = d["jobs"]
    assert job["packages"] == {
        "added": {"scipy": "1.0"},
        "removed": {"numpy": "1.26.0"},
        "changed": {"tinypkg": ["1.0", "2.0"]},
    }
    assert job["inputs"] == [
        {"job": "prepare", "manifest_hash": ["m1", "m2"], "source": ["data-run-1/prepare", "data-run-2/prepare"]}
    ]
    assert job["environment"] == {"gpus": [["A100"], ["H100"]]} and job["exit_code"] == [0, 1]
    assert "agent" not in job and "spec" not in job and d["identical"] is False
    gaps = reproduction_gaps(d)
    assert any("package tinypkg resolved to 2.0, not the recorded 1.0" in g for g in gaps)
    assert any("gpus H100, not the recorded A100" in g for g in gaps)
    same = diff_records(a, record("r3", job={"agent": "a2", "timings_s": {"running": 3.0}}))
    assert same["identical"] is True and reproduction_gaps(same) == []


def test_jobs_match_by_workflow_then_position_and_a_missing_one_is_said() -> None:
    a = record("r1")
    b = record("r2")
    b["jobs"] = [dict(b["jobs"][0], job_name="train-node0"), dict(b["jobs"][0], job_name="train-node1")]
    d = diff_records(a, b)
    assert [j.get("only_in") for j in d["jobs"]] == ["r2"] and d["jobs"][0]["index"] == 1


def test_package_names_are_canonical_and_direct_references_compare_by_url() -> None:
    assert package_changes("Foo_Bar==1\nx @ file:///a.whl\n", "foo-bar==1\nx @ file:///b.whl\n") == {
        "changed": {"x": ["file:///a.whl", "file:///b.whl"]}
    }


def test_tree_changes_list_files_and_a_unified_diff() -> None:
    a = {"train.py": ("file 0", b"print(1)\n"), "old.txt": ("file 0", b"x\n"), "blob": ("file 0", b"\0\1")}
    b = {"train.py": ("file 111", b"print(2)\n"), "new.txt": ("file 0", b"y\n"), "blob": ("file 0", b"\0\2")}
    out = tree_changes(a, b, unified=True)
    assert out["added"] == ["new.txt"] and out["removed"] == ["old.txt"] and out["changed"] == ["blob", "train.py"]
    text = out["unified_diff"]
    assert "-print(1)\n+print(2)\n" in text and "mode of train.py: file 0 -> file 111" in text
    assert "Binary files a/blob" in text and "+++ b/new.txt" in text and "--- a/old.txt" in text


def test_the_environment_cache_keys_on_pip_constraints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A venv resolved without `--pin`'s constraints (or with others) is not reused for a pinned job."""
    from dstack.agent import env_helper

    requirements = tmp_path / "requirements.txt"
    requirements.write_text("tinypkg\n")
    monkeypatch.delenv("PIP_CONSTRAINT", raising=False)
    plain = env_helper.env_key(str(requirements))
    constraints = tmp_path / "c.txt"
    constraints.write_text("tinypkg==1.0\n")
    monkeypatch.setenv("PIP_CONSTRAINT", str(constraints))
    pinned = env_helper.env_key(str(requirements))
    constraints.write_text("tinypkg==2.0\n")
    assert len({plain, pinned, env_helper.env_key(str(requirements))}) == 3


def test_the_readable_diff_puts_each_file_under_the_run_that_has_it_and_skips_empty_rows() -> None:
    from rich.console import Console

    from dstack.cli.diff_view import render_diff

    console = Console(record=True, width=100, color_system=None)
    diff = {
        "version": "dstack.run-diff/v1",
        "runs": ["old-owl-1", "new-owl-1"],
        "identical": False,
        "code": {"untracked": {"added": ["helper.py"], "removed": []}, "files": {"removed": ["gone.py"]}},
    }
    render_diff(diff, console)
    lines = console.export_text().splitlines()
    assert not any("untracked removed" in line for line in lines)
    added = next(line for line in lines if "untracked added" in line)
    header = next(line for line in lines if "old-owl-1" in line and "new-owl-1" in line)
    assert added.index("helper.py") >= header.index("new-owl-1")  # under RUN2, the run that has it
    removed = next(line for line in lines if "files removed" in line)
    assert removed.index("gone.py") < header.index("new-owl-1")  # under RUN1
