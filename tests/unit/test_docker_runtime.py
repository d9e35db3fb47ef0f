"""The Docker runtime's pure parts: the container it asks for, the image it picks, pull progress."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TypedDict, Unpack

import pytest

from dstack.agent.runtimes.base import RuntimeError_, RuntimeJob
from dstack.agent.runtimes.docker import (
    LABEL_HOME,
    DockerOptions,
    DockerRuntime,
    _PullProgress,
    container_config,
    pick_image,
)

OPTS = DockerOptions(bash_image="debian:bookworm-slim", python_image="python:{version}-slim", cuda_image="cuda:12")


class JobChanges(TypedDict, total=False):
    """The RuntimeJob fields a test sets."""

    working_dir: str
    commands: list[str]
    gpu_indices: list[int]
    gpu_uuids: list[str]
    image: str
    cpu: float
    memory_bytes: int
    shm_size_bytes: int
    provider: str
    python_version: str
    ports: list[tuple[int, int]]
    gpus_simulated: bool


def job(**changes: Unpack[JobChanges]) -> RuntimeJob:
    base = RuntimeJob(
        job_id="j1", workdir=Path("/agent/jobs/j1"), working_dir="src", commands=["echo hi"], env={"A": "1"}
    )
    return dataclasses.replace(base, **changes)


def test_real_gpus_are_requested_by_uuid_through_a_device_request() -> None:
    uuids = ["GPU-1111", "GPU-2222"]
    cfg = container_config(job(gpu_indices=[3, 5], gpu_uuids=uuids), OPTS, "cuda:12", "/agent")
    (req,) = cfg["device_requests"]
    # what `docker run --gpus '"device=GPU-1111,GPU-2222"'` sends
    assert req["Driver"] == "" and req["Count"] == 0
    assert req["DeviceIDs"] == uuids
    assert req["Capabilities"] == [["gpu"]]
    assert cfg["environment"]["NVIDIA_VISIBLE_DEVICES"] == "GPU-1111,GPU-2222"
    assert cfg["environment"]["CUDA_VISIBLE_DEVICES"] == "GPU-1111,GPU-2222"


def test_simulated_gpus_go_only_into_the_environment() -> None:
    cfg = container_config(job(gpu_indices=[6], gpus_simulated=True), OPTS, "cuda:12", "/agent")
    assert "device_requests" not in cfg
    assert cfg["environment"]["NVIDIA_VISIBLE_DEVICES"] == "6"
    assert cfg["environment"]["CUDA_VISIBLE_DEVICES"] == "6"


def test_a_job_without_gpus_sees_none() -> None:
    cfg = container_config(job(), OPTS, "debian", "/agent")
    assert cfg["environment"]["CUDA_VISIBLE_DEVICES"] == ""
    assert cfg["environment"]["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert "device_requests" not in cfg


def test_limits_mounts_labels_and_the_shell() -> None:
    cfg = container_config(
        job(memory_bytes=64 << 20, cpu=1.5, shm_size_bytes=1 << 30), OPTS, "debian:bookworm-slim", "/agent"
    )
    assert cfg["mem_limit"] == cfg["memswap_limit"] == 64 << 20
    assert cfg["nano_cpus"] == 1_500_000_000
    assert cfg["shm_size"] == 1 << 30
    assert cfg["volumes"] == {"/agent/jobs/j1": {"bind": "/workflow", "mode": "rw"}}
    assert cfg["working_dir"] == "/workflow/src"
    assert cfg["labels"][LABEL_HOME] == "/agent" and cfg["labels"]["dstack.job-id"] == "j1"
    assert cfg["init"] is True
    assert cfg["entrypoint"][:2] == ["/bin/sh", "-c"] and cfg["entrypoint"][-1] == "set -e\necho hi\n"
    assert cfg["environment"]["A"] == "1"
    assert not {"mem_limit", "nano_cpus", "shm_size"} & set(container_config(job(), OPTS, "x", "/a"))


def test_without_commands_the_image_runs_its_own_command() -> None:
    cfg = container_config(job(commands=[]), OPTS, "nginx:1.27", "/agent")
    assert "entrypoint" not in cfg and "command" not in cfg


def test_ports_are_published_on_the_bridge_network() -> None:
    cfg = container_config(job(ports=[(8080, 80), (9000, 9000)]), OPTS, "x", "/a")
    assert cfg["ports"] == {"80/tcp": 8080, "9000/tcp": 9000}
    assert cfg["network_mode"] == "bridge"


def test_ports_on_the_host_network_cannot_be_remapped() -> None:
    host = DockerOptions(network="host")
    assert "ports" not in container_config(job(ports=[(9000, 9000)]), host, "x", "/a")
    with pytest.raises(RuntimeError_, match="8080:80: this agent's containers use the host network"):
        container_config(job(ports=[(8080, 80)]), host, "x", "/a")
    with pytest.raises(RuntimeError_, match="no network"):
        container_config(job(ports=[(80, 80)]), DockerOptions(network="none"), "x", "/a")


def test_working_dir_cannot_escape() -> None:
    with pytest.raises(RuntimeError_, match="escapes"):
        container_config(job(working_dir="../x"), OPTS, "x", "/a")


def test_the_image_comes_from_the_workflow_else_the_agent_by_provider() -> None:
    assert pick_image(job(image="ghcr.io/me/app:1"), OPTS) == "ghcr.io/me/app:1"
    assert pick_image(job(provider="python", python_version="3.10"), OPTS) == "python:3.10-slim"
    assert pick_image(job(provider="python"), OPTS) == "python:3.11-slim"
    assert pick_image(job(provider="bash", gpu_indices=[0]), OPTS) == "cuda:12"
    assert pick_image(job(provider="bash"), OPTS) == "debian:bookworm-slim"


def test_the_container_keeps_its_images_path_and_home() -> None:
    rt = DockerRuntime.__new__(DockerRuntime)
    rt.opts = OPTS
    env = rt.base_env({"PATH": "/home/me/.venv/bin", "HOME": "/home/me", "USER": "me", "LANG": "C.UTF-8"})
    # and where its servers listen for the agent to reach them (bridge: the container's own interfaces)
    assert env == {"LANG": "C.UTF-8", "DSTACK_LISTEN_ADDRESS": "0.0.0.0"}


def test_pull_progress_is_a_few_lines_and_errors_carry_the_engines_message() -> None:
    lines: list[str] = []
    p = _PullProgress("python:3.11-slim", lines.append)
    p.feed({"status": "Pulling from library/python", "id": "3.11-slim"})
    for i in range(100):
        p.feed({"status": "Downloading", "id": "layer1", "progressDetail": {"current": i * 1000, "total": 100_000}})
    p.feed({"status": "Pull complete", "id": "layer1"})
    p.feed({"status": "Status: Downloaded newer image for python:3.11-slim"})
    assert lines[0] == "dstack: pulling python:3.11-slim: Pulling from library/python"
    assert any("0/1 layers" in x for x in lines)
    assert lines[-1].endswith("Status: Downloaded newer image for python:3.11-slim")
    assert len(lines) < 10
    with pytest.raises(RuntimeError_, match=r"cannot pull image 'python:3\.11-slim': manifest unknown"):
        p.feed({"error": "manifest unknown"})


def test_the_agents_pids_limit_goes_to_every_container() -> None:
    assert container_config(job(), OPTS, "x", "/a", pids_limit=4096)["pids_limit"] == 4096
    assert "pids_limit" not in container_config(job(), OPTS, "x", "/a", pids_limit=0)  # 0: none
