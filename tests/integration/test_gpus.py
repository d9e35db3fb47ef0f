"""GPU placement end to end, with agents whose NVML layer is replaced by a simulated inventory
(`--simulate-gpus`); everything above that layer (inventory, heartbeats, scheduler, pinning) is real."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import Cluster, wait_for, write_project

pytestmark = pytest.mark.integration

GPU_JOBS = """
workflows:
  - name: one
    provider: bash
    commands: ['echo "gpus=$CUDA_VISIBLE_DEVICES"', "sleep 600"]
    resources: {gpu: 1}
  - name: four
    provider: bash
    commands: ['echo "gpus=$CUDA_VISIBLE_DEVICES"', "sleep 600"]
    resources: {gpu: 4}
  - name: h100
    provider: bash
    commands: ['echo "gpus=$CUDA_VISIBLE_DEVICES"']
    resources: {gpu: {count: 1, name: H100}}
  - name: a100-lower
    provider: bash
    commands: ['echo "gpus=$CUDA_VISIBLE_DEVICES"']
    resources: {gpu: {count: 2, name: a100, memory: 40GB}}
"""


def submit(cluster: Cluster, project: Path, workflow: str) -> str:
    r = cluster.cli("run", "-d", workflow, cwd=project)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def gpus_of(cluster: Cluster, name: str) -> list[str]:
    found = wait_for(lambda: re.search(r"gpus=(\S*)", cluster.cli("logs", name).stdout), what=f"the GPU line of {name}")
    return found.group(1).split(",")


def test_a_four_gpu_job_waits_while_three_are_free_and_starts_when_a_fourth_frees(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.start_coordinator()
    cluster.start_agent("host-3", "--simulate-gpus", "8xA100-80GB")
    project = write_project(tmp_path / "p", GPU_JOBS)
    small = [submit(cluster, project, "one") for _ in range(5)]
    for n in small:
        cluster.wait_status(n, {"running"})
    taken = {n: gpus_of(cluster, n) for n in small}
    assert sorted(g for gs in taken.values() for g in gs) == sorted({g for gs in taken.values() for g in gs})
    big = submit(cluster, project, "four")
    run = wait_for(lambda: (r := cluster.run_info(big))["message"] and r, what="a pending reason", interval=0.2)
    assert run["status"] == "pending"
    assert run["message"] == "waiting: 4 GPUs free on no agent; busy: host-3 (5/8 GPUs)"
    assert "waiting: 4 GPUs free" in " ".join(cluster.cli("ps").stdout.split())  # the table says it too
    cluster.cli("stop", small[0])
    cluster.wait_status(big, {"running"}, timeout=30)
    four = gpus_of(cluster, big)
    assert len(four) == 4
    still_busy = {g for n in small[1:] for g in taken[n]}
    assert not still_busy & set(four)  # disjoint from the GPUs of the jobs still running
    assert set(taken[small[0]]) <= set(four)  # the freed GPU is one of them
    for n in [*small[1:], big]:
        cluster.cli("stop", n)


def test_an_h100_job_never_lands_on_an_a100_agent_and_says_why(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("a100-box", "--simulate-gpus", "8xA100-80GB")
    project = write_project(tmp_path / "p", GPU_JOBS)
    name = submit(cluster, project, "h100")
    a100 = submit(cluster, project, "a100-lower")  # name and memory match case-insensitively: runs
    assert cluster.wait_status(a100, {"done", "failed"})["status"] == "done"
    assert len(gpus_of(cluster, a100)) == 2
    run = wait_for(lambda: (r := cluster.run_info(name))["message"] and r, what="a pending reason", interval=0.2)
    assert run["status"] == "pending"
    assert run["message"] == (
        "waiting: needs 1 x H100; the largest agent has 0 matching GPUs (agents have NVIDIA A100-80GB (simulated))"
    )
    cluster.start_agent("h100-box", "--simulate-gpus", "2xH100-80GB")
    assert cluster.wait_status(name, {"done", "failed"})["status"] == "done"
    listing = {a["name"]: a for a in cluster.agents_json()}
    assert listing["a100-box"]["running_jobs"] == 0
    r = cluster.cli("ps", "-a", "--json")
    job = next(x for x in json.loads(r.stdout) if x["name"] == name)
    assert job["status"] == "done"


def test_agents_lists_gpus_free_and_total_and_marks_simulated_ones(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("gpu-box", "--simulate-gpus", "4xA100-80GB")
    cluster.start_agent("cpu-box")
    project = write_project(tmp_path / "p", GPU_JOBS)
    name = submit(cluster, project, "one")
    cluster.wait_status(name, {"running"})
    agents = {a["name"]: a for a in cluster.agents_json()}
    gpu_box = agents["gpu-box"]
    assert gpu_box["status"] == "online" and gpu_box["runtime"] == "host"
    assert gpu_box["running_jobs"] == 1
    gpus = gpu_box["gpus"]
    assert len(gpus) == 4 and all(g["simulated"] for g in gpus)
    assert sum(g["busy"] for g in gpus) == 1
    assert {"memory_total_bytes", "memory_used_bytes", "utilization_percent", "temperature_c", "uuid"} <= set(gpus[0])
    assert agents["cpu-box"]["gpus"] == []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", "400")  # each cell on one line (the table has a DISK column), to find it
        table = cluster.cli("agents").stdout
    assert "3/4 free" in table and "simulated" in table
    cluster.cli("stop", name)
