"""The compat `dstack` module (agent/provider_compat) runs real 2022 provider programs, and the agent reads what they
wrote (agent/provider_jobs.py). ivan-bokov's `providers/torchrun/main.py` (dstack-test-providers 3a5d6b1, June 2022,
from the corpus bundle) is run as its providers.yaml runs it: `PYTHONPATH=providers python3 providers/torchrun/main.py`
(its `pip3 install -r requirements.txt` step needs the network and installs the 2022 `dstack`, which the compat
module replaces; torch is needed only by the jobs it produces)."""

from __future__ import annotations

import json
import os
import shutil
import string
import subprocess
from pathlib import Path

import pytest

from dstack.agent.provider_jobs import (
    COMPAT_DIR,
    JOBS_FILE,
    ProvidedJobsError,
    parse_jobs,
    provider_env,
    read_jobs_file,
)
from dstack.agent.runner import job_env, master_job_env
from dstack.coordinator.gangs import member_env
from dstack.coordinator.provided_jobs import _checked
from dstack.protos.v1 import common_pb2

BUNDLE = Path(__file__).parents[1] / "corpus2022" / "companions" / "ivan-bokov_dstack-test-providers.bundle"
SYSTEM_PYTHON = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")


def _checkout(tmp_path: Path) -> Path:
    repo = tmp_path / "ivan-bokov"
    subprocess.run(["git", "clone", "--quiet", str(BUNDLE), str(repo)], check=True)
    subprocess.run(["git", "checkout", "--quiet", "3a5d6b1"], cwd=repo, check=True)
    return repo


def _run_program(repo: Path, workdir: Path, data: dict[str, object]) -> subprocess.CompletedProcess[str]:
    assert SYSTEM_PYTHON is not None
    env = provider_env({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir)}, str(workdir), str(COMPAT_DIR))
    env["DSTACK_WORKFLOW_DATA"] = json.dumps(data)
    command = "PYTHONPATH=providers python3 providers/torchrun/main.py"  # the entry's own line, verbatim
    return subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="needs a system python3 (user site enabled)")
def test_ivan_bokovs_torchrun_program_produces_a_master_and_its_workers(tmp_path: Path) -> None:
    repo = _checkout(tmp_path)
    workdir = tmp_path / "job"
    workdir.mkdir()
    data: dict[str, object] = {"name": "ddp", "provider": "torchrun", "script": "main.py"}
    data["resources"] = {"nodes": 3, "gpu": 1}
    r = _run_program(repo, workdir, data)
    assert r.returncode == 0, r.stdout + r.stderr
    parent = common_pb2.JobSpec(job_name="ddp", workflow="ddp", provider="torchrun", provider_program=True)
    raw = read_jobs_file(workdir)
    assert raw is not None
    jobs = parse_jobs(raw, parent)
    assert [j.job_name for j in jobs] == ["ddp-1", "ddp-2", "ddp-3"]
    assert [j.gang for j in jobs] == ["", "ddp-1", "ddp-1"]  # `master=masterJob`: the coordinator makes the gang
    assert all(j.image == "dstackai/python:3.9-cuda-11.1" and j.resources.gpu.count == 1 for j in jobs)
    assert jobs[0].port_count == 1
    master = "--nnodes=3 --node_rank=0 --master_addr $JOB_HOSTNAME --master_port $JOB_PORT_0 main.py"
    assert jobs[0].commands == [f"torchrun --nproc_per_node=1 {master}"]
    assert "--node_rank=2 --master_addr $MASTER_JOB_HOSTNAME --master_port $MASTER_JOB_PORT_0" in jobs[2].commands[0]


@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="needs a system python3 (user site enabled)")
def test_a_program_run_without_the_agent_says_what_is_missing(tmp_path: Path) -> None:
    repo = _checkout(tmp_path)
    r = subprocess.run(
        [str(SYSTEM_PYTHON), "providers/torchrun/main.py"],
        cwd=repo,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"providers:{COMPAT_DIR}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "DSTACK_WORKFLOW_DATA is not set" in r.stderr


def test_the_jobs_file_is_read_bounded_and_never_through_a_link(tmp_path: Path) -> None:
    assert read_jobs_file(tmp_path) is None  # a program that wrote none: the run's one job, as before
    (tmp_path / JOBS_FILE).symlink_to("/etc/passwd")
    with pytest.raises(ProvidedJobsError, match="is a link"):
        read_jobs_file(tmp_path)
    (tmp_path / JOBS_FILE).unlink()
    os.mkfifo(tmp_path / JOBS_FILE)  # would block a reader forever
    with pytest.raises(ProvidedJobsError, match="not a regular file"):
        read_jobs_file(tmp_path)


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ({"jobs": []}, "returned no jobs"),
        ([1], 'must be {"jobs": [...]}'),
        ({"jobs": [{"depends_on": [0]}]}, "must name another job"),
        ({"jobs": [{"master": True}, {}]}, "must name another job"),
        ({"jobs": [{"resources": {"memory": "lots"}}]}, "is not a size"),
        ({"jobs": [{"resources": {"gpu": {"count": -1}}}]}, "whole number"),
        ({"jobs": [{"environment": {"A": "x" * 70_000}}]}, "must be a string"),
    ],
)
def test_every_field_of_the_jobs_file_is_checked(doc: object, error: str) -> None:
    with pytest.raises(ProvidedJobsError, match=error.replace("[", r"\[").replace("]", r"\]").replace("{", r"\{")):
        parse_jobs(json.dumps(doc).encode(), common_pb2.JobSpec(job_name="p"))


def test_sizes_read_as_the_cli_reads_them() -> None:
    doc = {"jobs": [{"resources": {"memory": "64GB", "shm_size": "1.5GiB", "gpu": {"count": 2, "memory": "16GB"}}}]}
    [job] = parse_jobs(json.dumps(doc).encode(), common_pb2.JobSpec(job_name="p"))
    assert job.resources.memory_bytes == 64 * 10**9 and job.resources.shm_size_bytes == int(1.5 * 2**30)
    assert job.resources.gpu.count == 2 and job.resources.gpu.memory_bytes == 16 * 10**9


@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="needs a system python3 (user site enabled)")
def test_the_torchrun_programs_master_and_workers_meet_at_the_gangs_address(tmp_path: Path) -> None:
    """2022's master listened on its own $JOB_HOSTNAME:$JOB_PORT_0 and its workers dialled
    $MASTER_JOB_HOSTNAME:$MASTER_JOB_PORT_0: with the environment the coordinator (gang placement, provided
    jobs) and the agent give them, every node's torchrun names the same MASTER_ADDR:MASTER_PORT."""
    repo = _checkout(tmp_path)
    workdir = tmp_path / "job"
    workdir.mkdir()
    data: dict[str, object] = {
        "name": "ddp",
        "provider": "torchrun",
        "script": "main.py",
        "resources": {"nodes": 3, "gpu": 1},
    }
    assert _run_program(repo, workdir, data).returncode == 0
    parent = common_pb2.JobSpec(job_name="ddp", workflow="ddp", provider="torchrun", provider_program=True)
    raw = read_jobs_file(workdir)
    assert raw is not None
    specs = _checked(parse_jobs(raw, parent), {"ddp"}, "bold-owl-1")
    assert [(s.gang, s.node_rank) for s in specs] == [("ddp-1", 0), ("ddp-1", 1), ("ddp-1", 2)]
    for checked in specs:
        spec = common_pb2.JobSpec.FromString(checked.encoded)
        # What the agent builds (agent/runner.py): its own picked port first, then the gang's, then 2022's master.
        env = job_env("agent-host", [40001]) | member_env("10.1.0.7:29511", checked.node_rank, len(specs))
        env |= dict(spec.env)
        if checked.node_rank == 0:
            env |= master_job_env(env)
        command = string.Template(spec.commands[0]).safe_substitute(env)
        assert "--master_addr 10.1.0.7 --master_port 29511" in command, command
    assert master_job_env({"MASTER_ADDR": "", "MASTER_PORT": ""}) == {}
