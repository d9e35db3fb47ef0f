"""protos/artifact_paths.py: relative artifact paths are under the job's working_dir, in the CLI, the coordinator
and the agent (2022: dstackai/dstack bff1ac2 runner executor.go); nothing through a working_dir leaves the code."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

import pytest

from dstack.agent.artifacts import ArtifactError, _collect_with_stat, input_destination, prepare_dirs
from dstack.cli.workflows import output_paths
from dstack.protos.artifact_paths import BadWorkingDir, in_code, recorded, working_dir_prefix
from dstack.protos.v1 import agent_pb2, common_pb2
from tests.conftest import write_project


@pytest.mark.parametrize(
    ("working_dir", "path", "expected"),
    [("", "out", "out"), (".", "out/a", "out/a"), ("sub", "out", "sub/out"), ("a/./b/", "./out/", "a/b/out")],
)
def test_a_relative_artifact_is_under_the_working_dir(working_dir: str, path: str, expected: str) -> None:
    assert in_code(working_dir, path) == expected
    assert recorded(working_dir, expected) == posixpath.normpath(path)


@pytest.mark.parametrize("working_dir", ["..", "../x", "/etc", "sub/../..", "a\x00b", "x" * 5000])
def test_a_working_dir_out_of_the_code_is_refused(working_dir: str) -> None:
    with pytest.raises(BadWorkingDir):
        working_dir_prefix(working_dir)
    with pytest.raises(ValueError):
        in_code(working_dir, "out")


@pytest.mark.parametrize("path", ["", "..", "../out", "/abs", "a/../../b"])
def test_an_artifact_path_out_of_the_working_dir_is_refused(path: str) -> None:
    with pytest.raises(ValueError):
        in_code("sub", path)


def test_the_cli_leaves_outputs_out_of_the_code_where_the_job_saves_them(tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "p",
        "workflows:\n  - name: w\n    provider: bash\n    working_dir: sub\n    commands: [x]\n    artifacts: [out]\n",
    )
    assert output_paths(project) == ["sub/out"]


def _spec(path: str) -> common_pb2.ArtifactSpec:
    return common_pb2.ArtifactSpec(path=path)


def test_the_agent_saves_and_receives_under_the_working_dir(tmp_path: Path) -> None:
    code = tmp_path / "code"
    (code / "sub").mkdir(parents=True)
    prepare_dirs(code, [_spec("out")], "sub")
    assert (code / "sub" / "out").is_dir() and not (code / "out").exists()
    (code / "sub" / "out" / "r.txt").write_text("x")
    [f] = _collect_with_stat(code, [_spec("out")], {}, "sub")
    assert (f.path, f.rel) == ("out/r.txt", "sub/out/r.txt")
    src = agent_pb2.ArtifactInput(run_name="r", job_name="j", files=[common_pb2.ArtifactFile(path="out/r.txt")])
    assert input_destination(src, src.files[0], code, {}, "other") == (code / "other" / "out" / "r.txt").resolve()


def test_a_working_dir_that_is_a_symlink_out_of_the_code_is_never_followed(tmp_path: Path) -> None:
    """The job's code holds `sub -> /somewhere/else` and the workflow says `working_dir: sub`: the agent makes no
    folder there, saves nothing from there, and writes no input there."""
    outside = tmp_path / "outside"
    (outside / "out").mkdir(parents=True)
    (outside / "out" / "secret").write_text("not the job's")
    code = tmp_path / "code"
    code.mkdir()
    os.symlink(outside, code / "sub")
    with pytest.raises(ArtifactError):
        prepare_dirs(code, [_spec("made")], "sub")
    assert not (outside / "made").exists()
    with pytest.raises(ArtifactError):
        _collect_with_stat(code, [_spec("out")], {}, "sub")
    src = agent_pb2.ArtifactInput(run_name="r", job_name="j", files=[common_pb2.ArtifactFile(path="out/x")])
    with pytest.raises(ArtifactError):
        input_destination(src, src.files[0], code, {}, "sub")
