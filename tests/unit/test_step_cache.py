"""The step cache's keys and the store's copy (coordinator/cache.py, storage/*.py `copy`); end to end in
tests/integration/test_step_cache.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from dstack.coordinator.cache import base_key, full_key, image_of, secrets_digest
from dstack.coordinator.model import ArtifactFile, ArtifactInput
from dstack.protos.v1 import common_pb2
from dstack.storage import LocalStore, ObjectNotFound


def spec(**fields: object) -> bytes:
    base: dict[str, object] = {"job_name": "prep", "workflow": "prep", "provider": "bash", "commands": ["echo hi"]}
    return common_pb2.JobSpec(**{**base, **fields}).SerializeToString()  # type: ignore[arg-type]


def test_the_key_ignores_the_cache_flag_but_not_the_spec_code_repository_or_secrets() -> None:
    key = base_key("github.com/org/repo", "c" * 64, spec(), "s")
    assert base_key("github.com/org/repo", "c" * 64, spec(cache=True), "s") == key  # cache: true and --reuse agree
    assert base_key("github.com/org/repo", "c" * 64, spec(commands=["echo ho"]), "s") != key
    assert base_key("github.com/org/repo", "c" * 64, spec(env={"LR": "0.1"}), "s") != key
    assert base_key("github.com/org/repo", "c" * 64, spec(image="python:3.12-slim"), "s") != key
    assert base_key("github.com/org/repo", "d" * 64, spec(), "s") != key
    assert base_key("github.com/org/other", "c" * 64, spec(), "s") != key
    assert base_key("github.com/org/repo", "c" * 64, spec(), "t") != key


def test_secrets_enter_by_an_hmac_under_the_coordinators_key() -> None:
    one = secrets_digest(b"k1", {"TOKEN": "a"})
    assert one == secrets_digest(b"k1", {"TOKEN": "a"})
    assert one != secrets_digest(b"k1", {"TOKEN": "b"})
    assert one != secrets_digest(b"k2", {"TOKEN": "a"})  # another coordinator's key: nothing to compare
    assert len(one) == 64 and "secret-value" not in secrets_digest(b"k1", {"TOKEN": "secret-value"})


def test_inputs_enter_by_job_and_manifest_not_by_run_or_order() -> None:
    files = [ArtifactFile("download", "data/x", 3, "e" * 64)]
    a = ArtifactInput("bold-owl-1", "download", files)
    b = ArtifactInput("calm-fox-2", "download", files)  # another run, the same files
    other = ArtifactInput("bold-owl-1", "other", [ArtifactFile("other", "y", 1, "f" * 64)])
    assert full_key("base", [a]) == full_key("base", [b])
    assert full_key("base", [a, other]) == full_key("base", [other, a])
    assert full_key("base", [a]) != full_key(
        "base", [ArtifactInput("r", "download", [ArtifactFile("d", "data/x", 4, "e" * 64)])]
    )
    assert full_key("base", []) != full_key("base", [a])


def test_show_says_whether_the_image_is_pinned_by_digest() -> None:
    assert image_of(spec(image="python:3.11-slim")) == {"image": "python:3.11-slim", "image_by_digest": False}
    assert image_of(spec(image="python@sha256:" + "a" * 64))["image_by_digest"] is True
    assert image_of(spec())["image"] == "(the agent's default)"


def test_a_folder_store_links_instead_of_copying(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    store.put_bytes("runs/a/j/artifacts/x.bin", b"payload")
    store.copy("runs/a/j/artifacts/x.bin", "runs/b/j/artifacts/x.bin")
    src, dst = tmp_path / "objects/runs/a/j/artifacts/x.bin", tmp_path / "objects/runs/b/j/artifacts/x.bin"
    assert dst.read_bytes() == b"payload" and dst.stat().st_ino == src.stat().st_ino
    store.delete_prefix("runs/a")  # the source run deleted: the copy stays whole
    assert store.read_bytes("runs/b/j/artifacts/x.bin") == b"payload"
    with pytest.raises(ObjectNotFound):
        store.copy("runs/a/j/artifacts/x.bin", "runs/c/j/artifacts/x.bin")
    assert not list((tmp_path / "objects").rglob(".tmp-*"))
