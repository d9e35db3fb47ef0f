"""Artifacts, code and logs in a real S3 server (SeaweedFS), through the real CLI, coordinator and agents.

Only the coordinator holds the S3 credentials (Cluster.coordinator_env); the CLI and the agents get
presigned URLs. Objects are checked from outside with plain boto3."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from dstack.storage.devserver import SeaweedServer
from tests.conftest import Cluster, LocalMode, wait_for, write_project
from tests.integration.test_dependencies import FILES, SEED, submitted

pytestmark = pytest.mark.integration


def s3_client(server: SeaweedServer) -> Any:  # a boto3 client: boto3 ships no types
    import boto3

    env = server.env()
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


def keys(server: SeaweedServer, prefix: str) -> list[str]:
    s3 = s3_client(server)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="dstack", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def objects(server: SeaweedServer, prefix: str) -> dict[str, bytes]:
    """Keys and contents under prefix. Only for a quiet prefix: a key deleted between the listing and
    the read (retention at work) raises NoSuchKey; a prefix being emptied is watched with keys()."""
    s3 = s3_client(server)
    return {key: s3.get_object(Bucket="dstack", Key=key)["Body"].read() for key in keys(server, prefix)}


def s3_cluster(cluster: Cluster, server: SeaweedServer, *extra: str) -> str:
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    cluster.coordinator_env = server.env()
    cluster.start_coordinator("--storage", f"s3://dstack/{prefix}", *extra)
    return prefix


def test_seed_example_with_artifacts_in_s3(cluster: Cluster, seaweed: SeaweedServer, tmp_path: Path) -> None:
    prefix = s3_cluster(cluster, seaweed)
    cluster.start_agent()
    files = {
        **FILES,
        # a file big enough to go up in parallel parts (multipart), next to the small ones
        "download.py": FILES["download.py"]
        + "\n        open('data/big.bin', 'wb').write(os.urandom(70 * 1024 * 1024 + 3))\n",
    }
    root = write_project(tmp_path / "p", SEED, files)
    r = cluster.cli("run", "train", cwd=root)
    assert r.returncode == 0, r.stderr
    run = submitted(r.stderr)
    assert f"train | trained on data from {run}" in r.stdout
    assert "code:" in r.stderr and "uploaded" in r.stderr

    # Every object matches the manifest, read by an outside client; the manifest is there.
    for job, expected in (("download", {"data/sub/train.csv", "data/big.bin"}), ("train", {"model/weights.txt"})):
        got = objects(seaweed, f"{prefix}/runs/{run}/{job}/")
        manifest = json.loads(got.pop(f"{prefix}/runs/{run}/{job}/manifest.json"))
        assert {f["path"] for f in manifest["files"]} == expected
        for f in manifest["files"]:
            data = got[f"{prefix}/runs/{run}/{job}/artifacts/{f['path']}"]
            assert len(data) == f["size"] and hashlib.sha256(data).hexdigest() == f["sha256"]
    code = objects(seaweed, f"{prefix}/code/")
    assert len(code) == 1 and all(k.endswith(hashlib.sha256(v).hexdigest() + ".tar.gz") for k, v in code.items())

    # The CLI downloads with presigned URLs (it has no credentials), checking each file.
    out = tmp_path / "out"
    r = cluster.cli("artifacts", "download", run, "data", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "data" / "sub" / "train.csv").read_text().startswith("x,y")
    assert (out / "data" / "big.bin").stat().st_size == 70 * 1024 * 1024 + 3
    assert not (out / "model").exists()  # PATH selects

    # Unchanged code: 0 bytes up from the CLI, 0 bytes down to the agent that has it.
    r = cluster.cli("run", "train", cwd=root)
    assert r.returncode == 0, r.stderr
    assert "uploaded" not in r.stderr
    assert cluster.agents[0].output().count("code ") == 1  # fetched once, for the first run


def test_corrupted_object_is_a_checksum_error_and_is_not_kept(
    cluster: Cluster, seaweed: SeaweedServer, tmp_path: Path
) -> None:
    prefix = s3_cluster(cluster, seaweed)
    cluster.start_agent()
    root = write_project(tmp_path / "p", SEED, FILES)
    r = cluster.cli("run", "download", "-t", "corrupt-me", cwd=root)
    assert r.returncode == 0, r.stderr
    run = submitted(r.stderr)
    key = f"{prefix}/runs/{run}/download/artifacts/data/sub/train.csv"
    s3 = s3_client(seaweed)
    good = s3.get_object(Bucket="dstack", Key=key)["Body"].read()
    s3.put_object(Bucket="dstack", Key=key, Body=bytes(b ^ 1 for b in good))  # same size, other bytes

    out = tmp_path / "out"
    r = cluster.cli("artifacts", "download", run, "-o", str(out))
    assert r.returncode == 1
    assert "data/sub/train.csv: checksum mismatch: expected sha256" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "data" / "sub" / "train.csv").exists()
    assert not list((out / "data" / "sub").glob("*"))  # no temp file left either

    # An agent fetching it for a dependant fails the job with the same clear reason.
    text = (root / ".dstack" / "workflows.yaml").read_text().replace("download:latest", "download:corrupt-me")
    (root / ".dstack" / "workflows.yaml").write_text(text)
    r = cluster.cli("run", "train-tagged", cwd=root)
    assert r.returncode == 1
    info = cluster.run_info(submitted(r.stderr))
    assert "checksum mismatch" in json.dumps(info)


def test_store_outage_during_upload_is_retried_and_then_fails_cleanly(
    cluster: Cluster, own_seaweed: SeaweedServer, tmp_path: Path
) -> None:
    prefix = s3_cluster(cluster, own_seaweed)
    agent = cluster.start_agent("agent-1", "--store-retry", "6")
    # Each job ends only when the test has taken the store away (a fixed sleep could end first under load).
    gate = tmp_path / "gate"
    gate.mkdir()
    root = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: save
            provider: bash
            commands:
              - mkdir -p out && for i in $(seq 50); do head -c 100000 /dev/urandom > out/f$i; done
              - while [ ! -e {gate}/$RUN_NAME ]; do sleep 0.05; done
            artifacts: [out]
        """,
    )
    # 1. The store goes away while the job runs and comes back during the upload's retries: done.
    r = cluster.cli("run", "save", "-d", cwd=root)
    run = submitted(r.stderr)
    wait_for(lambda: cluster.run_info(run)["status"] == "running", what="running")
    own_seaweed.kill()
    (gate / run).touch()
    wait_for(lambda: cluster.run_info(run)["jobs"][0]["status"] == "uploading", timeout=20)
    # Back only once an upload has failed and is being retried (the agent logs each retry).
    wait_for(lambda: re.search(r"out/f\d+.*; retrying in", agent.output()), timeout=20, what="a failed upload's retry")
    own_seaweed.start()
    info = cluster.wait_status(run, {"done", "failed"}, timeout=60)
    assert info["status"] == "done", info
    got = objects(own_seaweed, f"{prefix}/runs/{run}/save/")
    manifest = json.loads(got[f"{prefix}/runs/{run}/save/manifest.json"])
    assert len(manifest["files"]) == 50
    for f in manifest["files"]:
        assert hashlib.sha256(got[f"{prefix}/runs/{run}/save/artifacts/{f['path']}"]).hexdigest() == f["sha256"]

    # 2. It stays away longer than --store-retry: the job fails with that reason, never done with a part.
    r = cluster.cli("run", "save", "-d", cwd=root)
    run = submitted(r.stderr)
    wait_for(lambda: cluster.run_info(run)["status"] == "running", what="running")
    own_seaweed.kill()
    (gate / run).touch()
    info = cluster.wait_status(run, {"done", "failed"}, timeout=90)
    own_seaweed.start()
    job = info["jobs"][0]
    assert info["status"] == "failed" and "artifact upload failed" in json.dumps(job), info
    assert cluster.cli("artifacts", "list", run, "--json").stdout.strip() == "[]"
    assert f"{prefix}/runs/{run}/save/manifest.json" not in objects(own_seaweed, f"{prefix}/runs/{run}/")


def test_upload_a_folder_as_a_tagged_artifact_set_then_rm(
    cluster: Cluster, seaweed: SeaweedServer, tmp_path: Path
) -> None:
    prefix = s3_cluster(cluster, seaweed)
    cluster.start_agent()
    root = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: train
            depends-on: ["download:mnist"]
            provider: bash
            commands: ["cat data/sub/train.csv", "ls data"]
          - name: train-deps
            deps: [{tag: mnist}]
            provider: bash
            commands: ["wc -c < data/big.bin"]
        """,
        {"data/sub/train.csv": "x,y\n1,2\n"},
    )
    (root / "data" / "big.bin").write_bytes(b"\x01" * (65 * 1024 * 1024))
    r = cluster.cli("artifacts", "upload", "data", "-t", "mnist", "-w", "download", "--prefix", "data", cwd=root)
    assert r.returncode == 0, r.stderr
    assert "mnist ->" in r.stderr and "2 file(s)" in r.stderr
    tags = json.loads(cluster.cli("tags", "list", "--json", cwd=root).stdout)
    upload_run = tags[0]["run"]
    assert (tags[0]["name"], tags[0]["workflow"]) == ("mnist", "download")

    r = cluster.cli("run", "train", cwd=root)
    assert r.returncode == 0, r.stderr
    assert "1,2\nbig.bin\nsub\n" in r.stdout
    r = cluster.cli("run", "train-deps", cwd=root)
    assert r.returncode == 0, r.stderr
    assert str(65 * 1024 * 1024) in r.stdout

    # rm: refused while tagged, then deletes records and objects.
    r = cluster.cli("rm", upload_run)
    assert r.returncode == 1 and "is tagged mnist: delete the tag first" in r.stderr
    assert cluster.cli("tags", "delete", "mnist", cwd=root).returncode == 0
    assert objects(seaweed, f"{prefix}/runs/{upload_run}/")
    r = cluster.cli("rm", upload_run)
    assert r.returncode == 0, r.stderr
    assert objects(seaweed, f"{prefix}/runs/{upload_run}/") == {}
    assert all(x["name"] != upload_run for x in cluster.runs())
    r = cluster.cli("rm", upload_run)
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_logs_archived_to_the_store_and_expired_by_retention(
    cluster: Cluster, seaweed: SeaweedServer, tmp_path: Path
) -> None:
    prefix = s3_cluster(cluster, seaweed, "--archive-logs-after", "0", "--archive-interval", "0.3")
    cluster.start_agent()
    root = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: talk
            provider: bash
            commands: ["mkdir -p out && echo hi > out/x", "seq 1 3000"]
            artifacts: [out]
        """,
    )
    runs = []
    for tag in ("keep", ""):
        r = cluster.cli("run", "talk", *(["-t", tag] if tag else []), cwd=root)
        assert r.returncode == 0, r.stderr
        runs.append(submitted(r.stderr))
    for run in runs:
        wait_for(functools.partial(objects, seaweed, f"{prefix}/runs/{run}/talk/logs.jsonl.gz"), what="log archive")
        r = cluster.cli("logs", run)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [str(i) for i in range(1, 3001)]

    # Retention: logs of old runs go; artifacts of untagged ones too; a tagged run keeps its artifacts.
    assert cluster.coordinator is not None
    cluster.coordinator.terminate()
    cluster.start_coordinator(
        "--storage",
        f"s3://dstack/{prefix}",
        "--archive-interval",
        "0.3",
        "--retention-days",
        "0.00001",
        "--retention-artifacts",
    )
    kept, dropped = runs
    wait_for(lambda: not keys(seaweed, f"{prefix}/runs/{dropped}/"), what="retention")
    assert "deleted by the retention policy" in cluster.cli("logs", kept).stdout
    assert json.loads(cluster.cli("artifacts", "list", kept, "--json").stdout)
    assert json.loads(cluster.cli("artifacts", "list", dropped, "--json").stdout) == []
    assert set(objects(seaweed, f"{prefix}/runs/{kept}/")) == {
        f"{prefix}/runs/{kept}/talk/manifest.json",
        f"{prefix}/runs/{kept}/talk/artifacts/out/x",
    }


def test_bad_storage_settings_stop_the_coordinator_with_a_clear_error(
    cluster: Cluster, seaweed: SeaweedServer, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    def start(url: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "dstack.coordinator",
                "--state-dir",
                str(tmp_path / uuid.uuid4().hex),
                "--storage",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", **env},
            cwd=REPO,
        )

    env = seaweed.env()
    r = start("s3://no-such-bucket/x", env)
    assert r.returncode != 0 and "bucket 'no-such-bucket' does not exist" in r.stderr, r.stderr
    r = start("s3://dstack/x", {**env, "AWS_SECRET_ACCESS_KEY": "wrong"})
    assert r.returncode != 0 and "access denied" in r.stderr and "check the S3 credentials" in r.stderr, r.stderr
    r = start("s3://dstack/x", {**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert r.returncode != 0 and "cannot reach the store at http://127.0.0.1:9" in r.stderr, r.stderr
    r = start("s3://dstack/x?pathstyle=1", env)
    assert r.returncode != 0 and "unknown option 'pathstyle'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_local_mode_honours_dstack_storage(local: LocalMode, seaweed: SeaweedServer, tmp_path: Path) -> None:
    prefix = f"local-{uuid.uuid4().hex[:8]}"
    local.extra_env = {**seaweed.env(), "DSTACK_STORAGE": f"s3://dstack/{prefix}"}
    root = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: hello
            provider: bash
            commands: ["mkdir -p out && echo hello > out/greeting && cat out/greeting"]
            artifacts: [out]
        """,
    )
    r = local.cli("run", "hello", cwd=root)
    assert r.returncode == 0, r.stderr
    assert "hello" in r.stdout
    run = submitted(r.stderr)
    got = objects(seaweed, f"{prefix}/runs/{run}/hello/")
    assert got[f"{prefix}/runs/{run}/hello/artifacts/out/greeting"] == b"hello\n"
    assert f"{prefix}/runs/{run}/hello/manifest.json" in got
