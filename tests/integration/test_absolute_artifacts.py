"""Absolute artifact paths (issue 13 item 4), end to end with real processes: a folder inside the job's
container, saved like any artifact and mounted at the same path in dependants, never a folder on the host.

The 2022 conda example in miniature: `setup` writes an "environment" under /opt/envs/myenv in its container,
`use` (deps: [{workflow: setup}], a later run) and `same-run` (depends-on: [setup]) find it there."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.conftest import Cluster, LocalMode, search, wait_for, write_project
from tests.dockerd import BUSYBOX, Dockerd
from tests.integration.test_docker import docker_agent

pytestmark = pytest.mark.integration

ENV = "/opt/envs/myenv"

WORKFLOWS = f"""
workflows:
  - name: setup
    provider: bash
    commands:
      - test -d {ENV} && test -z "$(ls -A {ENV})" && echo "empty folder at {ENV}"
      - mkdir -p {ENV}/bin {ENV}/lib
      - echo "echo tool from the env" > {ENV}/bin/tool
      - echo 42 > {ENV}/lib/answer
      - echo relative > out/rel.txt
    artifacts:
      - path: {ENV}
      - out
  - name: use
    provider: bash
    deps:
      - workflow: setup
    commands:
      - sh {ENV}/bin/tool
      - echo "answer $(cat {ENV}/lib/answer)"
      - echo "relative $(cat out/rel.txt)"
      - echo corrupted > {ENV}/lib/answer
      - rm {ENV}/bin/tool
  - name: same-run
    provider: bash
    depends-on: [setup]
    commands:
      - echo "same run answer $(cat {ENV}/lib/answer)"
"""


def test_an_absolute_artifact_is_mounted_at_the_same_path_in_dependants(
    cluster: Cluster, dockerd: Dockerd, tmp_path: Path
) -> None:
    assert not Path(ENV).exists()  # on this host: the test checks that nothing is made there
    cluster.start_coordinator()
    home = docker_agent(cluster, dockerd)
    project = write_project(tmp_path / "p", WORKFLOWS)

    r = cluster.cli("run", "setup", cwd=project)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"empty folder at {ENV}" in r.stdout
    setup_run = search(r"(\S+) submitted", r.stderr).group(1)
    listed = json.loads(cluster.cli("artifacts", "list", setup_run, "--json").stdout)
    assert sorted(f["path"] for f in listed) == [f"{ENV}/bin/tool", f"{ENV}/lib/answer", "out/rel.txt"]

    # a later run: the last done run of `setup`, mounted at the same path
    r = cluster.cli("run", "use", cwd=project)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "tool from the env" in r.stdout and "answer 42" in r.stdout and "relative relative" in r.stdout

    # the same run (setup runs again first); `use` changed only its own copy
    r = cluster.cli("run", "same-run", cwd=project)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "same run answer 42" in r.stdout
    r = cluster.cli("run", "use", cwd=project)  # the newest setup run again, unchanged by the last `use`
    assert r.returncode == 0 and "answer 42" in r.stdout, r.stderr[-3000:]

    # downloads keep the path under the output folder, never at /opt/envs/myenv here
    out = tmp_path / "downloaded"
    r = cluster.cli("artifacts", "download", setup_run, ENV, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "opt/envs/myenv/lib/answer").read_text() == "42\n"
    assert not (out / "out").exists()
    assert not Path(ENV).exists()
    # the jobs' host folders go with the jobs
    jobs = home / "jobs"
    wait_for(lambda: not list(jobs.glob("*")), timeout=30, what="the jobs' folders to be removed")
    wait_for(lambda: not dockerd.containers(home), timeout=20, what="no container left")


def test_a_mounted_absolute_artifact_is_saved_while_the_job_runs(
    cluster: Cluster, dockerd: Dockerd, tmp_path: Path
) -> None:
    cluster.start_coordinator()
    docker_agent(cluster, dockerd, "agent-1", "--mount-sync", "0.3")
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: train
            provider: bash
            commands:
              - echo step-1 > /opt/ckpt/state
              - sleep 120
            artifacts:
              - path: /opt/ckpt
                mount: true
        """,
    )
    r = cluster.cli("run", "-d", "train", cwd=project)
    assert r.returncode == 0, r.stderr
    name = r.stdout.strip()

    def saved() -> bool:
        listed = cluster.cli("artifacts", "list", name, "--json")
        return listed.returncode == 0 and "/opt/ckpt/state" in listed.stdout

    wait_for(saved, timeout=90, interval=0.5, what="the checkpoint saved while the job runs")
    assert cluster.run_info(name)["status"] == "running"
    assert cluster.cli("stop", name).returncode == 0


def _submit_raw(cluster: Cluster, artifacts: list[str], commands: list[str]) -> str:
    from dstack.protos.v1 import client_pb2, client_pb2_grpc, common_pb2

    stub = client_pb2_grpc.ClientServiceStub(cluster.channel())
    meta = [("authorization", f"Bearer {cluster.admin_token}")]
    job = common_pb2.JobSpec(
        job_name="main",
        workflow="hostile",
        provider="bash",
        commands=commands,
        image=BUSYBOX,
        artifacts=[common_pb2.ArtifactSpec(path=p) for p in artifacts],
    )
    resp = stub.SubmitRun(client_pb2.SubmitRunRequest(workflow="hostile", jobs=[job]), metadata=meta)
    return str(resp.run.name)


def test_the_agent_refuses_a_hostile_path_sent_over_grpc_without_touching_the_host(
    cluster: Cluster, dockerd: Dockerd, tmp_path: Path
) -> None:
    cluster.start_coordinator()
    home = docker_agent(cluster, dockerd)
    target = tmp_path / f"escape-{uuid.uuid4().hex[:8]}"  # where `..` would lead from the agent's folders
    hops = "/.." * 12
    cases = {
        f"{hops}{target}": "contains '..'",
        "/proc/self": "is inside /proc",
        "/": "is the whole container",
        "/workflow/../..": "contains '..'",
    }
    for path, message in cases.items():
        name = _submit_raw(cluster, [path], [f"mkdir -p {path} && echo written > {path}/x"])
        run = cluster.wait_status(name, {"failed", "done"}, timeout=90)
        assert run["status"] == "failed", run
        assert message in str(run["message"]), run
    assert not target.exists()
    # nothing of theirs ran: no container was ever created for them, and their folders are gone
    wait_for(lambda: not list((home / "jobs").glob("*")), timeout=30, what="the jobs' folders to be removed")
    assert not dockerd.containers(home)


def test_a_pool_of_host_agents_keeps_the_job_waiting_with_the_reason(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("host-only", "--runtime", "host")
    project = write_project(tmp_path / "p", WORKFLOWS)
    r = cluster.cli("run", "-d", "setup", cwd=project)
    assert r.returncode == 0, r.stderr
    name = r.stdout.strip()
    run = wait_for(lambda: (x := cluster.run_info(name))["message"] and x, what="a pending reason", interval=0.2)
    assert run["status"] == "pending", run  # waiting, not failed: an agent with Docker may join
    assert "needs an agent with the docker runtime" in str(run["message"])
    ps = cluster.cli("ps")
    assert "docker runtime" in " ".join(ps.stdout.split()), ps.stdout
    assert not Path(ENV).exists()

    # a dependant that only receives the folder needs a container too: the coordinator marks it
    from dstack.protos.v1 import client_pb2, client_pb2_grpc

    r = cluster.cli("run", "-d", "same-run", cwd=project)
    assert r.returncode == 0, r.stderr
    stub = client_pb2_grpc.ClientServiceStub(cluster.channel())
    meta = [("authorization", f"Bearer {cluster.admin_token}")]
    run_pb = stub.GetRun(client_pb2.GetRunRequest(name=r.stdout.strip()), metadata=meta).run
    assert {j.job_name: j.spec.needs_container for j in run_pb.jobs} == {"setup": True, "same-run": True}


def test_local_mode_without_docker_refuses_at_once(local: LocalMode, tmp_path: Path) -> None:
    project = write_project(tmp_path / "p", WORKFLOWS)  # the local agent runs host processes (the fixture's)
    r = local.cli("run", "setup", cwd=project)
    assert r.returncode == 2, r.stderr
    text = " ".join(r.stderr.split())
    assert "workflows.yaml:12:" in text, text  # the line of `path: /opt/envs/myenv`
    assert f"saves {ENV}, an absolute artifact path" in text and "the local agent runs host processes" in text
    assert "Traceback" not in r.stderr
    r = local.cli("run", "use", cwd=project)  # a dependant fails the same way, at its deps line
    assert r.returncode == 2 and f"mounts {ENV}, saved by 'setup'" in " ".join(r.stderr.split()), r.stderr
    runs = json.loads(local.cli("ps", "-a", "--json", cwd=project).stdout or "[]")
    assert runs == []  # nothing was submitted
