from __future__ import annotations

import gzip
import io
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

from dstack.cli.packing import pack


def names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as t:
        return t.getnames()


def git_repo(root: Path) -> Callable[..., None]:
    """A new repository at root; returns a function that runs git in it."""

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    return git


def test_same_tree_same_hash(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("print(1)\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("b")
    first = pack(tmp_path)
    (tmp_path / "a.py").touch()  # a new mtime does not change the content
    assert pack(tmp_path).ref.hash == first.ref.hash
    (tmp_path / "a.py").write_text("print(2)\n")
    assert pack(tmp_path).ref.hash != first.ref.hash


def test_git_tree_respects_ignore_and_records_the_commit(tmp_path: Path) -> None:
    git = git_repo(tmp_path)
    (tmp_path / ".gitignore").write_text("data/\n")
    (tmp_path / "train.py").write_text("x")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.bin").write_text("ignored")
    git("add", ".")
    git("commit", "-qm", "init")
    (tmp_path / "new.py").write_text("untracked but not ignored")
    packed = pack(tmp_path)
    assert names(packed.data) == [".gitignore", "new.py", "train.py"]
    assert packed.ref.branch == "main"
    assert len(packed.ref.commit) == 40
    assert packed.ref.dirty


def test_excluded_folders_stay_out_outside_git(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x")
    (tmp_path / "home" / "local").mkdir(parents=True)
    (tmp_path / "home" / "local" / "coordinator.db").write_text("state")
    assert names(pack(tmp_path, exclude=(tmp_path / "home",)).data) == ["a.py"]


def test_artifact_folders_are_left_out_unless_git_tracks_them(tmp_path: Path) -> None:
    git = git_repo(tmp_path)
    for rel in ("train.py", "model/README.md", "model/w.bin", "src/out/x.bin", "models.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    git("add", "train.py", "model/README.md")
    git("commit", "-qm", "init")
    packed = pack(tmp_path, outputs=["model", "src/out"])
    # model/README.md is tracked: the user means it to be code; `models.txt` only shares a prefix.
    assert sorted(names(packed.data)) == ["model/README.md", "models.txt", "train.py"]
    assert packed.left_out == ["model", "src/out"]
    assert packed.files == 3


def test_outside_git_artifact_folders_are_left_out(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_text("w")
    packed = pack(tmp_path, outputs=["model"])
    assert names(packed.data) == ["a.py"] and packed.left_out == ["model"]


def test_untracked_credentials_stay_home(tmp_path: Path) -> None:
    """A token left in the working tree (`.env`, `.netrc`, a key) is not packed unless git tracks it."""
    git = git_repo(tmp_path)
    files = {
        "train.py": "x",
        ".env": "HF_TOKEN=hf_secret",
        ".env.example": "HF_TOKEN=",
        "conf/.netrc": "machine example.com password p",
        "keys/server.pem": "-----BEGIN PRIVATE KEY-----",
        ".aws/credentials": "[default]",
        "kaggle.json": '{"key": "k"}',
        "tracked.key": "committed on purpose",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    git("add", "train.py", "tracked.key")
    git("commit", "-qm", "init")
    packed = pack(tmp_path)
    assert sorted(names(packed.data)) == [".env.example", "tracked.key", "train.py"]
    assert packed.credentials_left_out == [".aws/credentials", ".env", "conf/.netrc", "kaggle.json", "keys/server.pem"]
    assert b"hf_secret" not in gzip.decompress(packed.data)


def test_credentials_stay_home_outside_git(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x")
    (tmp_path / ".netrc").write_text("machine h password p")
    packed = pack(tmp_path)
    assert names(packed.data) == ["a.py"]
    assert packed.credentials_left_out == [".netrc"]
