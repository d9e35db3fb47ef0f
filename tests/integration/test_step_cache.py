"""The step cache end to end (docs/reproducibility.md, "Step cache"): the real CLI, coordinator and agent.

Each job appends a line to a file outside the project when its command runs (its side effect), so a test
knows whether a job ran or was reused, whatever the coordinator says about it.

- `cache: true`: the second run reuses the first's artifacts (nothing runs, `dstack run` says so, `dstack
  ps`/`dstack show` show the hit, the key and the source); a changed file of the tree runs it again;
  `--no-cache` runs it; `--reuse` reuses for a workflow without `cache: true`.
- The seed's download -> train chain (docs: /work/shared/seed/workflows.md) with `cache: true` on
  download: the second run reuses download and train reads the same bytes.
- A failed job is never reused; a deleted run, or source files deleted behind the coordinator's back,
  are never offered (the job runs instead).
- Attacks: a client cannot claim a hit (every client-controlled field carries the source's key, the
  command differs: it runs; a code hash never uploaded is refused); a member whose secrets differ from the
  owner's never gets the owner's files through a hit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from dstack.storage.devserver import SeaweedServer
from tests.conftest import Cluster, search, write_project

pytestmark = pytest.mark.integration


def submitted(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return search(r"(\S+) submitted", r.stderr).group(1)


def show(cluster: Cluster, name: str, token: str = "") -> dict[str, Any]:
    r = cli_as(cluster, token, "show", name, "--json") if token else cluster.cli("show", name, "--json")
    assert r.returncode == 0, r.stderr
    record: dict[str, Any] = json.loads(r.stdout)
    return record


def cache_of(record: dict[str, Any], job: str) -> dict[str, Any]:
    found: dict[str, Any] = next(j for j in record["jobs"] if j["job_name"] == job)["cache"]
    return found


def ran(side: Path) -> list[str]:
    return side.read_text().split() if side.exists() else []


def cli_as(cluster: Cluster, token: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**cluster.env(), "DSTACK_TOKEN": token, "DSTACK_HOME": str(cluster.tmp / f"home-{hash(token) & 0xFFFF}")}
    return subprocess.run(
        [sys.executable, "-m", "dstack.cli", *args], capture_output=True, text=True, env=env, cwd=cwd or cluster.tmp
    )


def add_user(cluster: Cluster, name: str) -> str:
    r = cluster.cli("users", "add", name, "--role", "member")
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()[1]


def step_project(root: Path, side: Path, cache: str = "cache: true") -> Path:
    return write_project(
        root,
        f"""
        workflows:
          - name: prep
            provider: bash
            {cache}
            commands:
              - echo prep >> {side}
              - mkdir -p data && cp input.txt data/copy.txt && head -c 64 /dev/urandom > data/noise.bin
            artifacts: [data]
        """,
        {"input.txt": "v1\n", "notes.md": "unrelated\n"},
    )


def run_done(cluster: Cluster, *args: str, cwd: Path, token: str = "") -> tuple[str, str]:
    """`dstack run ARGS` followed to its end: (run name, stderr)."""
    r = cli_as(cluster, token, "run", *args, cwd=cwd) if token else cluster.cli("run", *args, cwd=cwd)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return search(r"(\S+) submitted", r.stderr).group(1), r.stderr


def noise(cluster: Cluster, run: str, tmp: Path) -> bytes:
    out = tmp / f"dl-{run}"
    r = cluster.cli("artifacts", "download", run, "-o", str(out))
    assert r.returncode == 0, r.stderr
    return next(out.rglob("noise.bin")).read_bytes()


def test_cached_step_is_skipped_then_runs_after_a_change_and_with_no_cache(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("a1")
    side = tmp_path / "side.txt"
    project = step_project(tmp_path / "p", side)

    first, _ = run_done(cluster, "prep", cwd=project)
    assert ran(side) == ["prep"]
    second, err = run_done(cluster, "prep", cwd=project)
    assert ran(side) == ["prep"], "the cached step ran again"
    assert f"prep: reused from {first}" in err
    job = cluster.run_info(second)["jobs"][0]
    assert job["status"] == "done" and job["message"] == f"reused from {first}"
    hit, miss = cache_of(show(cluster, second), "prep"), cache_of(show(cluster, first), "prep")
    assert hit["hit"] is True and (hit["source_run"], hit["source_job"]) == (first, "prep")
    assert miss["hit"] is False and hit["key"] == miss["key"] and len(hit["key"]) == 64
    assert "by reference" in cluster.cli("show", second).stdout
    wide = {**cluster.env(), "COLUMNS": "200"}  # the table folds its columns on a narrow terminal
    ps = subprocess.run([sys.executable, "-m", "dstack.cli", "ps", "-a"], capture_output=True, text=True, env=wide)
    assert f"prep reused from {first}" in ps.stdout, ps.stdout
    # The files are the first run's, byte for byte (random bytes: a second run would have made others).
    assert noise(cluster, second, tmp_path) == noise(cluster, first, tmp_path)

    (project / "input.txt").write_text("v2\n")  # a file of the tree the job sees
    third, _ = run_done(cluster, "prep", cwd=project)
    assert ran(side) == ["prep", "prep"]
    assert cache_of(show(cluster, third), "prep")["key"] != miss["key"]

    run_done(cluster, "prep", "--no-cache", cwd=project)
    assert ran(side) == ["prep"] * 3
    r = cluster.cli("run", "prep", "--reuse", "--no-cache", cwd=project)
    assert r.returncode != 0 and "contradict" in r.stderr and "Traceback" not in r.stderr


def test_a_wrong_cache_value_is_an_error_at_its_line(cluster: Cluster, tmp_path: Path) -> None:
    project = step_project(tmp_path / "p", tmp_path / "side.txt", cache="cache: sometimes")
    r = cluster.cli("run", "prep", cwd=project)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert search(r"workflows\.yaml:5:\d+: 'cache' must be true or false", r.stderr)


SEED = """
workflows:
  - name: download
    help: "Downloads the training data"
    provider: python
    file: "download.py"
    artifacts: ["data"]
    cache: true

  - name: train
    help: "Trains a model and saves the checkpoints"
    depends-on:
      - download
    provider: python
    file: "train.py"
    artifacts: ["model"]
"""


def seed_project(root: Path, side: Path) -> Path:
    return write_project(
        root,
        SEED,
        {
            "download.py": f"""
                import os
                open({str(side)!r}, "a").write("download\\n")
                os.makedirs("data", exist_ok=True)
                open("data/train.bin", "wb").write(os.urandom(256))
            """,
            "train.py": f"""
                import hashlib, os
                open({str(side)!r}, "a").write("train\\n")
                os.makedirs("model", exist_ok=True)
                seen = hashlib.sha256(open("data/train.bin", "rb").read()).hexdigest()
                open("model/seen.txt", "w").write(seen)
            """,
        },
    )


def seen_by_train(cluster: Cluster, run: str, tmp: Path) -> str:
    out = tmp / f"model-{run}"
    r = cluster.cli("artifacts", "download", run, "-o", str(out))
    assert r.returncode == 0, r.stderr
    return next(out.rglob("seen.txt")).read_text()


def test_seed_chain_reuses_download_and_train_reads_the_same_bytes(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("a1")
    side = tmp_path / "side.txt"
    project = seed_project(tmp_path / "p", side)

    first, _ = run_done(cluster, "train", cwd=project)
    assert ran(side) == ["download", "train"]
    second, err = run_done(cluster, "train", cwd=project)
    assert ran(side) == ["download", "train", "train"], "download ran again, or train did not"
    assert f"download: reused from {first}" in err
    assert seen_by_train(cluster, second, tmp_path) == seen_by_train(cluster, first, tmp_path)
    record = show(cluster, second)
    assert cache_of(record, "download")["hit"] is True
    assert cache_of(record, "train")["hit"] is False and cache_of(record, "train")["asked"] is False

    # --reuse: train too, though it has no `cache: true` (its inputs' manifests are the same).
    third, err = run_done(cluster, "train", "--reuse", cwd=project)
    assert ran(side) == ["download", "train", "train"]
    assert f"train: reused from {second}" in err and f"download: reused from {second}" in err
    assert seen_by_train(cluster, third, tmp_path) == seen_by_train(cluster, first, tmp_path)


def test_failed_jobs_deleted_runs_and_missing_files_are_never_reused(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("a1")
    side, flag = tmp_path / "side.txt", tmp_path / "ok"
    project = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: flaky
            provider: bash
            cache: true
            commands:
              - echo flaky >> {side}
              - mkdir -p out && date +%s%N > out/t.txt
              - test -f {flag}
            artifacts: [out]
        """,
    )
    r = cluster.cli("run", "flaky", cwd=project)
    assert r.returncode != 0
    flag.write_text("")
    good, _ = run_done(cluster, "flaky", cwd=project)
    assert ran(side) == ["flaky"] * 2, "a failed job was reused"

    # The source's files vanish behind the coordinator's back: the next run runs instead of pointing at them.
    shutil.rmtree(cluster.tmp / "server" / "storage" / "runs" / good)
    again, _ = run_done(cluster, "flaky", cwd=project)
    assert ran(side) == ["flaky"] * 3
    assert cache_of(show(cluster, again), "flaky")["hit"] is False
    hit, err = run_done(cluster, "flaky", cwd=project)
    assert f"reused from {again}" in err and ran(side) == ["flaky"] * 3

    # Deleted runs feed nothing: both runs that hold these files go, and the job runs.
    for name in (again, hit):
        assert cluster.cli("rm", name).returncode == 0
    run_done(cluster, "flaky", cwd=project)
    assert ran(side) == ["flaky"] * 4


def test_a_client_cannot_claim_a_hit(cluster: Cluster, tmp_path: Path) -> None:
    from dstack.protos.v1 import client_pb2, client_pb2_grpc, common_pb2

    cluster.start_coordinator()
    cluster.start_agent("a1")
    side = tmp_path / "side.txt"
    project = step_project(tmp_path / "p", side)
    first, _ = run_done(cluster, "prep", cwd=project)
    record = show(cluster, first)
    key = cache_of(record, "prep")["key"]

    # The source's spec, code and repository, with its key in every field a client controls, but another
    # command: the coordinator's key is its own, so the job runs.
    stub = client_pb2_grpc.ClientServiceStub(cluster.channel())
    meta = [("authorization", f"Bearer {cluster.admin_token}")]
    run = stub.GetRun(client_pb2.GetRunRequest(name=first), metadata=meta).run
    spec = common_pb2.JobSpec()
    spec.CopyFrom(run.jobs[0].spec)
    spec.commands[:] = [f"echo forged >> {side}", "mkdir -p data && echo forged > data/copy.txt"]
    spec.env["DSTACK_CACHE_KEY"] = key
    spec.cache = True
    forged = client_pb2.SubmitRunRequest(
        workflow="prep",
        jobs=[spec],
        code=run.code,
        args=[key],
        repository="local/p",  # the CLI sends local/FOLDER; the coordinator adds the user
        resolved_workflow=json.dumps({"cache": {"key": key, "hit": True, "source_run": first}}),
    )
    name = stub.SubmitRun(forged, metadata=meta).run.name
    cluster.wait_status(name, {"done", "failed"}, timeout=120)
    assert ran(side) == ["prep", "forged"]
    assert cache_of(show(cluster, name), "prep")["hit"] is False

    # The same spec with a code tree the coordinator never received: refused, not a hit.
    bogus = common_pb2.CodeRef()
    bogus.CopyFrom(run.code)
    bogus.hash = "0" * 64
    with pytest.raises(grpc.RpcError) as refused:
        stub.SubmitRun(client_pb2.SubmitRunRequest(workflow="prep", jobs=[spec], code=bogus), metadata=meta)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_member_never_gets_another_users_files_made_with_their_secrets(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("a1")
    alice, bob = add_user(cluster, "alice"), add_user(cluster, "bob")
    side = tmp_path / "side.txt"
    project = step_project(tmp_path / "p", side)
    # One repository for both (a shared remote): only the secrets tell their runs apart.
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["git", "remote", "add", "origin", "https://github.com/org/shared.git"], cwd=project, check=True)
    r = cli_as(cluster, alice, "secrets", "add", "API_TOKEN", "alice-private-value", "--personal")
    assert r.returncode == 0, r.stderr

    theirs, _ = run_done(cluster, "prep", cwd=project, token=alice)
    mine, err = run_done(cluster, "prep", cwd=project, token=bob)
    assert ran(side) == ["prep", "prep"] and "reused" not in err, "bob got alice's files"
    assert cache_of(show(cluster, mine), "prep")["key"] != cache_of(show(cluster, theirs), "prep")["key"]
    again, err = run_done(cluster, "prep", cwd=project, token=bob)
    assert f"reused from {mine}" in err and ran(side) == ["prep", "prep"]  # his own run, his own files
    assert "alice-private-value" not in json.dumps(show(cluster, again))


def test_a_hit_in_s3_copies_inside_the_store(cluster: Cluster, seaweed: SeaweedServer, tmp_path: Path) -> None:
    """S3: the hit's objects are copies made by the store (CopyObject, in parts for a file over boto3's 8 MiB
    threshold), byte for byte the source's, with a manifest that names the source."""
    from tests.integration.test_s3_storage import objects, s3_cluster

    prefix = s3_cluster(cluster, seaweed)
    cluster.start_agent("a1")
    side = tmp_path / "side.txt"
    project = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: big
            provider: bash
            cache: true
            commands:
              - echo big >> {side}
              - mkdir -p out && head -c 9437187 /dev/urandom > out/big.bin && echo small > out/small.txt
            artifacts: [out]
        """,
    )
    first, _ = run_done(cluster, "big", cwd=project)
    second, err = run_done(cluster, "big", cwd=project)
    assert f"big: reused from {first}" in err and ran(side) == ["big"]
    source, copy = objects(seaweed, f"{prefix}/runs/{first}/big/"), objects(seaweed, f"{prefix}/runs/{second}/big/")
    manifest = json.loads(copy.pop(f"{prefix}/runs/{second}/big/manifest.json"))
    assert manifest["reused_from"] == {"run": first, "job": "big"}
    source.pop(f"{prefix}/runs/{first}/big/manifest.json")
    assert {k.replace(first, second): v for k, v in source.items()} == copy
    assert len(copy[f"{prefix}/runs/{second}/big/artifacts/out/big.bin"]) == 9437187
