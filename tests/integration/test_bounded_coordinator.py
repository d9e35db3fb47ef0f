"""Issue 16, a bounded coordinator: names a client chooses cannot break the store's keys, and a long log
is archived and served back in constant memory (measured on the real coordinator process)."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from dstack.storage.devserver import SeaweedServer
from tests.conftest import PY, Cluster, free_port, wait_for, write_project

pytestmark = pytest.mark.integration

LINES = 1_000_000
RSS_LIMIT_KIB = 150 * 1024


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _submit(cluster: Cluster, job_name: str) -> str:
    from dstack.protos.v1 import client_pb2, client_pb2_grpc, common_pb2

    stub = client_pb2_grpc.ClientServiceStub(cluster.channel())
    meta = [("authorization", f"Bearer {cluster.admin_token}")]
    job = common_pb2.JobSpec(job_name=job_name, workflow="w", provider="bash", commands=["echo ok"])
    resp = stub.SubmitRun(client_pb2.SubmitRunRequest(workflow="w", jobs=[job]), metadata=meta)
    return str(resp.run.name)


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One coordinator for the refusal cases below (a start costs seconds on a busy CI machine, and each
    case only sends a request that must be refused, which changes nothing a later case could see)."""
    c = Cluster(tmp_path_factory.mktemp("refusing"), free_port())
    try:
        c.start_coordinator()
        yield c
    finally:
        c.stop_all()


@pytest.mark.parametrize("job_name", ["..", ".", "a/b", "../../etc", "x\ny", "a\\b", "x" * 201])
def test_a_job_name_that_is_not_one_key_segment_is_refused_over_raw_grpc(refusing: Cluster, job_name: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        _submit(refusing, job_name)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid job name" in str(e.value.details())


def test_every_name_that_reaches_a_key_or_a_path_is_checked_over_raw_grpc(cluster: Cluster) -> None:
    """Names a client chooses, sent as an attacker would (raw gRPC, past the CLI's own checks): each is
    refused with INVALID_ARGUMENT and a message naming what is wrong."""
    from dstack.protos.v1 import client_pb2, client_pb2_grpc, common_pb2

    cluster.start_coordinator()
    stub = client_pb2_grpc.ClientServiceStub(cluster.channel())
    meta = [("authorization", f"Bearer {cluster.admin_token}")]
    job = common_pb2.JobSpec(job_name="main", workflow="w", provider="bash", commands=["true"])
    run = stub.SubmitRun(client_pb2.SubmitRunRequest(workflow="w", jobs=[job]), metadata=meta).run.name  # queued
    attacks: dict[str, Callable[[], object]] = {
        "workflow of an upload": lambda: stub.CreateUpload(
            client_pb2.CreateUploadRequest(workflow="../w", tag="t", files=[common_pb2.FileSize(path="a", size=1)]),
            metadata=meta,
        ),
        "artifact path of an upload": lambda: stub.CreateUpload(
            client_pb2.CreateUploadRequest(workflow="w", tag="t", files=[common_pb2.FileSize(path="../../x", size=1)]),
            metadata=meta,
        ),
        "tag": lambda: stub.AddTag(client_pb2.AddTagRequest(tag="../t", run_name="r"), metadata=meta),
        "tag on done": lambda: stub.SubmitRun(
            client_pb2.SubmitRunRequest(workflow="w", jobs=[job], tag_on_done=".."), metadata=meta
        ),
        "repository": lambda: stub.SubmitRun(
            client_pb2.SubmitRunRequest(workflow="w", jobs=[job], repository="github.com/../x"), metadata=meta
        ),
        "secret": lambda: stub.AddSecret(client_pb2.AddSecretRequest(name="../S", value="v"), metadata=meta),
        "user": lambda: stub.AddUser(client_pb2.AddUserRequest(name="../u"), metadata=meta),
        "code hash": lambda: stub.HasCode(client_pb2.HasCodeRequest(hash="../" + "a" * 61), metadata=meta),
        "artifact path of a download": lambda: next(
            stub.DownloadArtifact(
                client_pb2.DownloadArtifactRequest(run_name=run, job_name="main", path="../../x"), metadata=meta
            )
        ),
    }
    for what, attack in attacks.items():
        with pytest.raises(grpc.RpcError) as e:
            attack()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, e.value.details())
        assert "invalid" in str(e.value.details()) or "must" in str(e.value.details()), (what, e.value.details())


def test_a_million_line_log_is_archived_and_served_in_bounded_memory(cluster: Cluster, tmp_path: Path) -> None:
    coordinator = cluster.start_coordinator("--archive-logs-after", "0", "--archive-interval", "0.5")
    cluster.start_agent()
    pid = coordinator.popen.pid
    before = _kib(pid, "VmRSS")
    project = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: talk
            provider: bash
            commands:
              - seq 1 {LINES}
        """,
    )
    r = cluster.cli("run", "-d", "talk", cwd=project)
    assert r.returncode == 0, r.stderr
    name = r.stdout.strip()
    cluster.wait_status(name, {"done"}, timeout=600)
    archive = tmp_path / "server" / "storage" / "runs" / name / "talk" / "logs.jsonl.gz"
    wait_for(archive.exists, timeout=300, interval=0.5, what="the log archived to the store")
    out = tmp_path / "logs.out"
    with out.open("w") as f:
        logs = subprocess.run(
            [PY, "-m", "dstack.cli", "logs", name], stdout=f, stderr=subprocess.PIPE, env=cluster.env(), timeout=600
        )
    assert logs.returncode == 0, logs.stderr
    with out.open() as f:
        count, last = 0, ""
        for count, last in enumerate(f, 1):  # noqa: B007 (the last line is what is checked)
            pass
    assert (count, last) == (LINES, f"{LINES}\n")
    peak = _kib(pid, "VmHWM")
    print(f"coordinator RSS before the job {before / 1024:.0f} MiB; peak (VmHWM) {peak / 1024:.0f} MiB")
    assert peak < RSS_LIMIT_KIB, f"peak RSS {peak / 1024:.0f} MiB"


def test_a_job_past_its_log_quota_keeps_running_and_says_so_once(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator("--max-log-bytes", "20000")
    cluster.start_agent()
    done = tmp_path / "finished"
    project = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: loud
            provider: bash
            commands:
              - seq 1 100000
              - touch {done}
        """,
    )
    r = cluster.cli("run", "-d", "loud", cwd=project)
    assert r.returncode == 0, r.stderr
    name = r.stdout.strip()
    run = cluster.wait_status(name, {"done", "failed"}, timeout=300)
    assert run["status"] == "done", run
    assert done.exists(), "the job did not run to its end"
    logs = cluster.cli("logs", name)
    assert logs.returncode == 0, logs.stderr
    lines = logs.stdout.splitlines()
    markers = [ln for ln in lines if "reached the coordinator's quota of 20000 bytes" in ln]
    assert len(markers) == 1, lines[-5:]
    numbers = [ln for ln in lines if ln.isdigit()]
    assert numbers == [str(i) for i in range(1, len(numbers) + 1)]  # a prefix, nothing lost before the quota
    assert 4000 < len(numbers) < 6000  # about 20000 bytes of text (1..5276 without their newlines)


def test_garbage_collection_keeps_what_a_queued_job_needs(cluster: Cluster, tmp_path: Path) -> None:
    """Unused code blobs (of a deleted run, and an upload never submitted) and stale `.tmp-*` objects go
    after the grace period; the blob of a job still waiting for an agent stays, and the job then runs."""
    cluster.start_coordinator("--gc-grace", "3", "--gc-interval", "0.5")
    storage = tmp_path / "server" / "storage"
    code = storage / "code"

    def run_project(name: str, marker: str) -> str:
        project = write_project(
            tmp_path / name,
            """
            workflows:
              - name: hello
                provider: bash
                commands:
                  - cat marker.txt
            """,
            {"marker.txt": marker},
        )
        r = cluster.cli("run", "-d", "hello", cwd=project)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    queued = run_project("queued", "the queued one")  # no agent yet: it waits
    blobs_of_queued = set(code.glob("*.tar.gz"))
    assert len(blobs_of_queued) == 1
    deleted = run_project("deleted", "the deleted one")
    # Taken before the run is removed: 3 s after that it may be collected, sooner than a loaded machine
    # gets back here from `rm`.
    (blob_of_deleted,) = set(code.glob("*.tar.gz")) - blobs_of_queued
    assert cluster.cli("stop", deleted).returncode == 0
    cluster.wait_status(deleted, {"stopped"})
    r = cluster.cli("rm", deleted)
    assert r.returncode == 0, r.stderr
    orphan = code / (("ab" * 32) + ".tar.gz")  # as a presigned upload never submitted leaves one
    orphan.write_bytes(b"never submitted")
    stale, fresh = storage / "runs" / "x" / ".tmp-crashed", storage / "runs" / "x" / ".tmp-writing"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half an object")
    fresh.write_bytes(b"being written")
    day = 86400.0
    os.utime(stale, (time.time() - day, time.time() - day))
    os.utime(fresh, (time.time() + day, time.time() + day))  # stays fresh however slow this machine is

    wait_for(
        lambda: not blob_of_deleted.exists() and not orphan.exists() and not stale.exists(),
        timeout=120,
        interval=0.5,
        what="the unused blobs and the stale temporary collected",
    )
    assert fresh.exists(), "a temporary still being written was collected"
    assert blobs_of_queued <= set(code.glob("*.tar.gz")), "the queued job's code was collected"
    cluster.start_agent()
    assert cluster.wait_status(queued, {"done", "failed"}, timeout=120)["status"] == "done"
    assert "the queued one" in cluster.cli("logs", queued).stdout


def test_an_unfinished_s3_multipart_upload_is_collected(
    seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a crash mid-upload leaves on S3 (a multipart upload never completed) is aborted once stale."""
    from dstack.storage import open_store
    from dstack.storage.s3 import S3Store

    for k, v in seaweed.env().items():
        monkeypatch.setenv(k, v)
    prefix = f"gc-{uuid.uuid4().hex[:8]}"
    store = open_store(f"s3://dstack/{prefix}")
    assert isinstance(store, S3Store)
    started = store.client.create_multipart_upload(Bucket=store.bucket, Key=f"{prefix}/runs/r/j/big")

    def pending() -> list[str]:
        uploads = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=f"{prefix}/").get("Uploads", [])
        return [u["UploadId"] for u in uploads]

    assert started["UploadId"] in pending()
    assert store.collect_temporaries(3600.0) == 0  # young: an upload may still be under way
    assert store.collect_temporaries(-60.0) == 1  # (a negative age: every upload counts as stale)
    assert started["UploadId"] not in pending()
