"""The SDK's parts that need no coordinator: the code cache, variables, and what a hostile listing gets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dstack.api import CliError, RunStatus
from dstack.api.code import CodeCache
from dstack.api.runs import _variable_args
from dstack.cli.commands.artifacts import download_artifacts
from dstack.protos.v1 import client_pb2, common_pb2
from tests.conftest import write_project


def tree(tmp_path: Path) -> Path:
    return write_project(
        tmp_path / "p",
        "workflows:\n  - name: w\n    provider: bash\n    commands: ['true']\n    artifacts: [out]\n",
        {"train.py": "print(1)\n", ".env": "TOKEN=secret\n", "out/result.bin": "downloaded\n"},
    )


def test_an_unchanged_tree_is_packed_once_and_a_change_is_seen(tmp_path: Path) -> None:
    root = tree(tmp_path)
    cache = CodeCache()
    first = cache.pack(root)
    assert cache.pack(root) is first  # same state: the same bytes, not packed again
    # What `dstack run` leaves out, the SDK leaves out: credentials and downloaded artifacts.
    assert "train.py" in first.names and ".env" not in first.names and "out/result.bin" not in first.names
    (root / "train.py").write_text("print(2)\n")  # same size, new content and mtime
    os.utime(root / "train.py", ns=(1, 1))
    second = cache.pack(root)
    assert second is not first and second.ref.hash != first.ref.hash
    (root / "new.py").write_text("")
    assert cache.pack(root).ref.hash != second.ref.hash


def test_variables_become_the_clis_overrides() -> None:
    assert _variable_args({"epochs": 3, "fast": True, "name": "a b"}) == ["--epochs=3", "--fast=true", "--name=a b"]
    assert _variable_args(None) == []
    assert RunStatus("done").finished and not RunStatus.RUNNING.finished
    assert RunStatus.of(common_pb2.RUN_STATUS_FAILED) is RunStatus.FAILED and RunStatus.of(99) is RunStatus.UNKNOWN


class HostileCoordinator:
    """Lists an artifact whose path climbs out of the download folder, and would stream its bytes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.streamed = False

    def list_artifacts_with_urls(self, name: str) -> client_pb2.ListArtifactsResponse:
        f = common_pb2.ArtifactFile(path=self.path, size=5, sha256="0" * 64, job_name="j")
        return client_pb2.ListArtifactsResponse(files=[f])

    def download(self, run: str, job: str, path: str) -> Iterator[bytes]:
        self.streamed = True
        yield b"owned"


@pytest.mark.parametrize("path", ["../../escape.txt", "out/../../escape.txt", "/../escape.txt"])
def test_a_listing_that_climbs_out_of_the_folder_writes_nothing(tmp_path: Path, path: str) -> None:
    hostile = HostileCoordinator(path)
    with pytest.raises(CliError, match="leads outside"):
        download_artifacts(hostile, "r", tmp_path / "dl")  # type: ignore[arg-type]
    assert not hostile.streamed
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path.parent / "escape.txt").exists()
