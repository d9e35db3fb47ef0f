"""The transfer engine against a real S3 server: multipart uploads, ranged downloads, checksums."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

import dstack.storage.s3 as s3mod
import dstack.storage.transfer as transfer
from dstack.storage.devserver import SeaweedServer
from dstack.storage.s3 import S3Location, S3Store
from dstack.storage.transfer import ChecksumError, Download, Transfer

pytestmark = pytest.mark.integration


@pytest.fixture
def store(seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    for k, v in seaweed.env().items():
        monkeypatch.setenv(k, v)
    # Small thresholds, so that a 13 MiB file takes the multipart and ranged paths.
    monkeypatch.setattr(s3mod, "MULTIPART_THRESHOLD", 1 << 20)
    monkeypatch.setattr(s3mod, "PART_SIZE", 5 << 20)
    monkeypatch.setattr(transfer, "RANGE_THRESHOLD", 1 << 20)
    monkeypatch.setattr(transfer, "RANGE_SIZE", 5 << 20)
    return S3Store(S3Location.parse(f"s3://dstack/transfer-{os.urandom(4).hex()}"))


def test_multipart_up_and_ranged_down_keep_every_byte(store: S3Store, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom((13 << 20) + 7))
    grant = store.grant_upload("big.bin", src.stat().st_size, 600)
    assert grant.upload_id and len(grant.part_urls) == 3
    seen: list[int] = []
    with Transfer(progress=seen.append) as t:
        up = t.put_file(src, grant)
        store.complete_upload("big.bin", grant.upload_id, up.etags)
        assert up.sha256 == hashlib.sha256(src.read_bytes()).hexdigest() and len(up.etags) == 3
        assert store.list_prefix("big.bin") == {"big.bin": up.size}
        dest = tmp_path / "out" / "big.bin"
        t.get_file(Download(store.presign_get("big.bin", 600), dest, up.size, up.sha256))
    assert dest.read_bytes() == src.read_bytes()
    assert sum(seen) == 2 * up.size  # progress counted every byte, up and down


@pytest.mark.parametrize("size", [10, (13 << 20) + 7])  # one stream, and ranges
def test_a_wrong_checksum_fails_and_leaves_nothing(store: S3Store, tmp_path: Path, size: int) -> None:
    store.put_bytes("x", os.urandom(size))
    out = tmp_path / "out"
    with Transfer() as t, pytest.raises(ChecksumError, match=r"x: checksum mismatch: expected sha256 0+, got"):
        t.get_file(Download(store.presign_get("x", 600), out / "x", size, "0" * 64, "x"))
    assert list(out.iterdir()) == []


def test_a_refused_request_is_not_retried(store: S3Store, tmp_path: Path) -> None:
    with Transfer(retry_for=60) as t, pytest.raises(transfer.TransferError, match="HTTP 404 NoSuchKey"):
        t.get_file(Download(store.presign_get("missing", 600), tmp_path / "m", 1, "0" * 64))
