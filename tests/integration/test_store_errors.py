"""The store's error tree (storage/errors.py) against a real S3 server (SeaweedFS): each way the store
refuses becomes its own type, from boto3 calls (the coordinator) and presigned transfers (agents, CLI)."""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import grpc
import pytest

from dstack.coordinator.services.rpc import status_for
from dstack.storage.backoff import Backoff
from dstack.storage.devserver import SeaweedServer
from dstack.storage.errors import AccessDenied, ExpiredGrant, NoSuchBucket, ObjectNotFound, StoreUnavailable
from dstack.storage.s3 import S3Location, S3Store
from dstack.storage.transfer import Download, Transfer

pytestmark = pytest.mark.integration


def s3(monkeypatch: pytest.MonkeyPatch, server: SeaweedServer, url: str, **env: str) -> S3Store:
    for k, v in {**server.env(), **env}.items():
        monkeypatch.setenv(k, v)
    return S3Store(S3Location.parse(url))


def get(url: str, dest: Path) -> None:
    with Transfer(backoff=Backoff(deadline_s=5.0, first_s=0.001, max_s=0.01)) as t:
        t.get_file(Download(url, dest, 1, "0" * 64, "x"))


def test_a_missing_bucket_is_no_such_bucket(
    seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bucket = f"missing-{os.urandom(4).hex()}"  # SeaweedFS creates a bucket on PUT: only reads are tried
    store = s3(monkeypatch, seaweed, f"s3://{bucket}/p")
    with pytest.raises(NoSuchBucket, match=f"bucket '{bucket}' does not exist at {seaweed.endpoint}") as e:
        store.check()
    assert status_for(e.value) is grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(NoSuchBucket):
        store.open_read("x")
    with pytest.raises(NoSuchBucket, match="HTTP 404 NoSuchBucket"):
        get(store.presign_get("x", 600), tmp_path / "x")


def test_a_wrong_secret_key_is_access_denied_naming_the_bucket_and_key(
    seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store = s3(monkeypatch, seaweed, "s3://dstack/denied", AWS_SECRET_ACCESS_KEY="wrong")
    needle = f"access denied by {seaweed.endpoint} .* to bucket 'dstack' with access key '{seaweed.access_key}'"
    for call in (store.check, lambda: store.open_read("x"), lambda: store.put_bytes("x", b"1")):
        with pytest.raises(AccessDenied, match=needle) as e:
            call()
        assert type(e.value) is AccessDenied and status_for(e.value) is grpc.StatusCode.PERMISSION_DENIED
    # The URL it signs is refused too: the agent's transfer says whose signature it was.
    with pytest.raises(AccessDenied, match=r"HTTP 403 SignatureDoesNotMatch.*access key 'dstack-test'") as e:
        get(store.presign_get("x", 600), tmp_path / "x")
    assert type(e.value) is AccessDenied


def test_an_expired_url_is_an_expired_grant_and_a_missing_object_is_not_found(
    seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store = s3(monkeypatch, seaweed, f"s3://dstack/e-{os.urandom(4).hex()}")
    store.put_bytes("x", b"1")
    assert store.presigner is not None
    then = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=120)
    old = store.presigner.url("GET", "dstack", store._key("x"), 60, now=then)
    with pytest.raises(ExpiredGrant, match="HTTP 403 AccessDenied: Request has expired"):
        get(old, tmp_path / "x")
    with pytest.raises(ObjectNotFound, match="HTTP 404 NoSuchKey"):
        get(store.presign_get("missing", 600), tmp_path / "m")
    with pytest.raises(ObjectNotFound):
        store.open_read("missing")


def test_an_unreachable_store_is_unavailable_and_retried_until_the_deadline(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tries = []

    def retryable(e: object) -> bool:
        tries.append(e)
        return isinstance(e, StoreUnavailable)

    with (
        Transfer(backoff=Backoff(deadline_s=0.2, first_s=0.001, max_s=0.01), retryable=retryable) as t,
        pytest.raises(StoreUnavailable, match=r"ConnectionRefusedError.*gave up after retrying") as e,
    ):
        t.get_file(Download(f"http://127.0.0.1:{port}/b/x", tmp_path / "x", 1, "0" * 64))
    assert e.value.exhausted and len(tries) > 1
    assert status_for(e.value) is grpc.StatusCode.UNAVAILABLE
