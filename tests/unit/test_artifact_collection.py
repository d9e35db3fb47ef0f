"""What the agent collects from a job's artifact folders: regular files only, through descriptors, never
following a symlink (the race itself runs in tests/integration/test_artifact_races.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from dstack.agent.artifacts import ArtifactError, collect_files, open_inside
from dstack.protos.v1 import common_pb2
from dstack.storage.base import UploadGrant
from dstack.storage.transfer import Transfer


def _spec(path: str) -> common_pb2.ArtifactSpec:
    return common_pb2.ArtifactSpec(path=path)


@pytest.fixture
def job(tmp_path: Path) -> Path:
    """A job folder whose `out` holds a file, a nested file, and symlinks, a fifo, and a symlinked
    folder, all leading to a secret beside the job folder."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_text("SECRET")
    w = tmp_path / "job"
    (w / "out" / "sub").mkdir(parents=True)
    (w / "out" / "a.txt").write_text("a")
    (w / "out" / "sub" / "b.txt").write_text("b")
    (w / "out" / "link").symlink_to(secret / "key")
    (w / "out" / "inside").symlink_to("a.txt")
    (w / "out" / "dirlink").symlink_to(secret)
    os.mkfifo(w / "out" / "pipe")
    (w / "whole").symlink_to(secret)
    return w


def test_only_regular_files_are_collected(job: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "dstack.agent"):
        files = collect_files(job, [_spec("out")])
    assert [rel for rel, _ in files] == ["out/a.txt", "out/sub/b.txt"]
    for name in ("out/link", "out/inside", "out/dirlink"):
        assert f"skipping symlink {name}" in caplog.text
    assert "skipping out/pipe: not a regular file" in caplog.text


def test_an_artifact_folder_that_is_a_symlink_is_skipped(job: Path) -> None:
    assert collect_files(job, [_spec("whole")]) == []
    with pytest.raises(ArtifactError, match="whole/key: not a folder inside the working directory"):
        open_inside(job, "whole/key")


def test_a_single_file_artifact(job: Path) -> None:
    assert [rel for rel, _ in collect_files(job, [_spec("out/a.txt")])] == ["out/a.txt"]
    assert collect_files(job, [_spec("missing")]) == []


@pytest.mark.parametrize(
    ("rel", "message"),
    [
        ("out/link", "out/link: cannot open it inside the working directory: a symlink (not followed)"),
        ("out/dirlink/key", "out/dirlink/key: not a folder inside the working directory"),
        ("out/pipe", "out/pipe: not a regular file"),
        ("../secret/key", "leads outside the working directory"),
        ("/etc/passwd", "must be relative to the working directory"),
    ],
)
def test_open_inside_refuses(job: Path, rel: str, message: str) -> None:
    with pytest.raises(ArtifactError) as e:
        open_inside(job, rel)
    assert message in str(e.value)


def test_open_inside_reads_the_file(job: Path) -> None:
    fd = open_inside(job, "out/sub/b.txt")
    try:
        assert os.read(fd, 10) == b"b"
    finally:
        os.close(fd)


def test_presigned_uploads_open_through_the_opener(job: Path) -> None:
    """The presigned path reads only what the agent's opener returns: a symlink fails before any byte
    is read or sent (there is no server here: nothing may be sent)."""
    transfer = Transfer(workers=1)
    try:
        opener = lambda p: open_inside(job, p.relative_to(job).as_posix())  # noqa: E731
        with pytest.raises(ArtifactError, match="a symlink"):
            transfer.put_file(job / "out" / "link", UploadGrant(key="k", url="http://127.0.0.1:1/x"), opener=opener)
    finally:
        transfer.close()
