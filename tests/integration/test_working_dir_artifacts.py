"""Relative artifact paths are relative to the job's working_dir (protos/artifact_paths.py; 2022: dstackai/dstack
bff1ac2 runner executor.go bound artifacts at /workflow/<working_dir>/<path>), with real processes, on the host
runtime and in Docker: `working_dir: sub` saving `out` saves sub/out, recorded as `out`; `dstack artifacts
download` writes `out/...`; a dependant finds `out/...` under its own working_dir."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from tests.conftest import Cluster, search, write_project
from tests.dockerd import BUSYBOX, Dockerd
from tests.integration.test_docker import docker_agent

pytestmark = pytest.mark.integration

WORKFLOWS = """
workflows:
  - name: produce
    provider: bash
    working_dir: sub
    commands:
      - test -f README && test -d out
      - echo made in sub > out/result.txt
    artifacts: [out]
  - name: consume
    provider: bash
    working_dir: other
    depends-on: [produce]
    commands:
      - test -f README
      - echo "got $(cat out/result.txt)"
      - test ! -e ../out && echo "nothing at the code root"
"""
FILES = {"sub/README": "the producer's folder\n", "other/README": "the consumer's folder\n"}


def _check_run(cluster: Cluster, project: Path, tmp_path: Path) -> None:
    r = cluster.cli("run", "consume", cwd=project, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "got made in sub" in r.stdout and "nothing at the code root" in r.stdout
    name = search(r"(\S+) submitted", r.stderr).group(1)
    run = cluster.run_info(name)
    assert run["status"] == "done" and {j["status"] for j in run["jobs"]} == {"done"}, run
    listed = json.loads(cluster.cli("artifacts", "list", name, "--json").stdout)
    assert [(f["job"], f["path"]) for f in listed] == [("produce", "out/result.txt")], listed
    out = tmp_path / "dl"
    d = cluster.cli("artifacts", "download", name, "-o", str(out))
    assert d.returncode == 0, d.stderr
    assert (out / "out" / "result.txt").read_text() == "made in sub\n"


def test_working_dir_artifacts_on_the_host_runtime(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    _check_run(cluster, write_project(tmp_path / "p", WORKFLOWS, FILES), tmp_path)
    _refuses_working_dirs_out_of_the_code(cluster)  # the same coordinator: one start fewer in CI


def test_working_dir_artifacts_in_docker(cluster: Cluster, dockerd: Dockerd, tmp_path: Path) -> None:
    cluster.start_coordinator()
    docker_agent(cluster, dockerd)
    _check_run(cluster, write_project(tmp_path / "p", WORKFLOWS, FILES), tmp_path)


def _refuses_working_dirs_out_of_the_code(cluster: Cluster) -> None:
    """A client that skips the CLI's check, over raw gRPC: the coordinator refuses the run, so no agent ever saves
    or receives artifacts through a folder out of the job's code."""
    from dstack.protos.v1 import client_pb2, client_pb2_grpc, common_pb2

    before = len(json.loads(cluster.cli("ps", "-a", "--json").stdout))
    stub = client_pb2_grpc.ClientServiceStub(cluster.channel())
    meta = [("authorization", f"Bearer {cluster.admin_token}")]
    for working_dir in ["..", "../x", "/etc", "sub/../..", "a\x00b", "x" * 5000]:
        job = common_pb2.JobSpec(
            job_name="main",
            workflow="hostile",
            provider="bash",
            commands=["echo x > out/x"],
            image=BUSYBOX,
            working_dir=working_dir,
            artifacts=[common_pb2.ArtifactSpec(path="out")],
        )
        with pytest.raises(grpc.RpcError) as e:
            stub.SubmitRun(client_pb2.SubmitRunRequest(workflow="hostile", jobs=[job]), metadata=meta)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, working_dir[:20]
        assert "working_dir" in (e.value.details() or ""), working_dir[:20]
    assert len(json.loads(cluster.cli("ps", "-a", "--json").stdout)) == before  # no run was stored
