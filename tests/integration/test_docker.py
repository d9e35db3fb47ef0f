"""The Docker runtime end to end: a real coordinator and agent, the tests' own dockerd, the real CLI."""

from __future__ import annotations

import functools
import json
import re
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Cluster, LocalMode, search, wait_for, write_project
from tests.dockerd import BUSYBOX, BUSYBOX_CMD, PYTHON, Dockerd

pytestmark = pytest.mark.integration


MAIN_PY = "import os, sys\nprint('python', sys.version_info[:2], os.path.exists('/.dockerenv'), sys.argv[1:])\n"


def docker_agent(cluster: Cluster, dockerd: Dockerd, name: str = "agent-1", *extra: str, wait: bool = True) -> Path:
    cluster.start_agent(
        name,
        "--runtime",
        "docker",
        "--docker-host",
        dockerd.host,
        "--docker-image-bash",
        BUSYBOX,
        "--docker-image-python",
        "dstack-test/python:{version}",
        "--docker-network",
        "none",
        *extra,
        wait=wait,
    )
    return cluster.tmp / name  # the agent's home, which labels its containers


def submit(cluster: Cluster, project: Path, workflow: str, *args: str) -> str:
    r = cluster.cli("run", "-d", workflow, *args, cwd=project)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def gpu_line(cluster: Cluster, name: str) -> re.Match[str] | None:
    return re.search(r"gpus (\S+) nvidia (\S+)", logs(cluster, name))


def logs(cluster: Cluster, name: str) -> str:
    return cluster.cli("logs", name).stdout


def test_a_job_runs_in_a_container_with_its_limits(cluster: Cluster, dockerd: Dockerd, tmp_path: Path) -> None:
    cluster.start_coordinator()
    home = docker_agent(cluster, dockerd)
    assert cluster.agents_json()[0]["runtime"] == "docker"
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: boxed
            provider: bash
            working_dir: sub
            environment: {GREETING: hello}
            commands:
              - test -f /.dockerenv && echo "dockerenv yes"
              - echo "cwd $(pwd)"
              - echo "code $(cat data.txt)"
              - echo "greeting $GREETING"
              - echo "memory $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)"
              - echo "quota $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)"
              - echo "shm $(df -k /dev/shm | tail -1 | awk '{print $2}')"
              - echo "cuda [$CUDA_VISIBLE_DEVICES] nvidia [$NVIDIA_VISIBLE_DEVICES]"
              - echo made-inside > /workflow/sub/out/result.txt  # artifacts are under working_dir
            artifacts: [out]
            resources:
              memory: 64MiB
              cpu: 0.5
              shm_size: 32MiB
          - name: hog
            provider: bash
            commands: ["head -c 200000000 /dev/zero | tail > /dev/null"]
            resources: {memory: 32MiB}
        """,
        {"sub/data.txt": "from the working tree\n"},
    )
    r = cluster.cli("run", "boxed", cwd=project)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "dockerenv yes" in out
    assert "cwd /workflow/sub" in out
    assert "code from the working tree" in out
    assert "greeting hello" in out
    assert f"memory {64 << 20}" in out
    assert "quota 50000 100000" in out  # 0.5 CPU
    assert f"shm {32 << 10}" in out
    assert "cuda [] nvidia [void]" in out
    name = search(r"(\S+) submitted", r.stderr).group(1)
    listed = cluster.cli("artifacts", "list", name)
    assert "out/result.txt" in listed.stdout, listed.stdout + listed.stderr
    # the container is removed once the job is over
    wait_for(lambda: not dockerd.containers(home), timeout=10, what="the container to be removed")
    r = cluster.cli("run", "hog", cwd=project)
    assert r.returncode == 1
    assert "(out of memory: the limit is 32 MiB)" in " ".join(r.stderr.split()), r.stderr[-2000:]


def test_stop_sends_sigterm_then_leaves_no_container(cluster: Cluster, dockerd: Dockerd, tmp_path: Path) -> None:
    cluster.start_coordinator()
    home = docker_agent(cluster, dockerd)
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: sleepy
            provider: bash
            commands:
              - trap 'echo "got TERM"; exit 3' TERM
              - echo ready
              - sleep 1000 & wait
        """,
    )
    name = submit(cluster, project, "sleepy")
    wait_for(lambda: "ready" in logs(cluster, name), what="the job to start")
    assert len(dockerd.containers(home)) == 1
    r = cluster.cli("stop", name)
    assert r.returncode == 0, r.stderr
    run = cluster.wait_status(name, {"stopped"}, timeout=30)
    assert run["termination_reason"] == "stopped by user"
    assert "got TERM" in logs(cluster, name)
    wait_for(lambda: not dockerd.containers(home), timeout=10, what="no container left")


def test_a_job_that_ignores_sigterm_is_killed_after_the_grace_period(
    cluster: Cluster, dockerd: Dockerd, tmp_path: Path
) -> None:
    cluster.start_coordinator()
    home = docker_agent(cluster, dockerd)
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: stubborn
            provider: bash
            commands: ["trap '' TERM", "echo ready", "while true; do sleep 0.2; done"]
        """,
    )
    name = submit(cluster, project, "stubborn")
    wait_for(lambda: "ready" in logs(cluster, name), what="the job to start")
    t0 = time.monotonic()
    cluster.cli("stop", name)
    cluster.wait_status(name, {"stopped"}, timeout=30)
    assert time.monotonic() - t0 >= 1.5  # --stop-grace 2 in the test cluster
    wait_for(lambda: not dockerd.containers(home), timeout=10, what="no container left")


def test_an_image_that_does_not_exist_fails_the_job_with_the_engines_message(
    cluster: Cluster, dockerd: Dockerd, tmp_path: Path
) -> None:
    cluster.start_coordinator()
    home = docker_agent(cluster, dockerd)
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: ghost
            provider: bash
            image: dstack-test/does-not-exist:1
            commands: ["echo never"]
        """,
    )
    name = submit(cluster, project, "ghost")
    run = cluster.wait_status(name, {"failed", "done"})
    assert run["status"] == "failed"
    assert run["termination_reason"] == "executor error"
    assert "cannot pull image 'dstack-test/does-not-exist:1'" in str(run["message"])
    text = logs(cluster, name)
    assert "dstack: pulling image dstack-test/does-not-exist:1" in text
    assert "never" not in text
    assert not dockerd.containers(home)


def test_python_provider_runs_in_the_python_image_of_its_version(
    cluster: Cluster, dockerd: Dockerd, tmp_path: Path
) -> None:
    dockerd.load_images(python=True)
    cluster.start_coordinator()
    docker_agent(cluster, dockerd)
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: py
            provider: python
            version: "3.11"
            file: main.py
            args: ["--n", "3"]
        """,
        {"main.py": MAIN_PY},
    )
    r = cluster.cli("run", "py", cwd=project)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "python (3, 11) True ['--n', '3']" in r.stdout
    assert PYTHON in dockerd.client().images.get(PYTHON).tags


def test_docker_provider_runs_an_image_with_or_without_commands(
    cluster: Cluster, dockerd: Dockerd, tmp_path: Path
) -> None:
    cluster.start_coordinator()
    docker_agent(cluster, dockerd)
    project = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: with-commands
            provider: docker
            image: {BUSYBOX}
            commands: ["echo from commands in $(pwd)"]
          - name: default-command
            provider: docker
            image: {BUSYBOX_CMD}
        """,
    )
    r = cluster.cli("run", "with-commands", cwd=project)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "from commands in /workflow" in r.stdout
    r = cluster.cli("run", "default-command", cwd=project)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "default command of the image" in r.stdout


def test_docker_provider_jobs_never_run_as_host_processes(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("host-only")
    project = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: boxed
            provider: docker
            image: {BUSYBOX}
            commands: ["echo hi"]
        """,
    )
    name = submit(cluster, project, "boxed")
    run = wait_for(lambda: (r := cluster.run_info(name))["message"] and r, what="a pending reason", interval=0.2)
    assert run["status"] == "pending"
    assert "needs an agent with the docker runtime" in str(run["message"])


def test_eight_one_gpu_containers_get_eight_different_gpus(cluster: Cluster, dockerd: Dockerd, tmp_path: Path) -> None:
    cluster.start_coordinator()
    docker_agent(cluster, dockerd, "gpu-host", "--simulate-gpus", "8xA100-80GB", "--docker-image-cuda", BUSYBOX)
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: one-gpu
            provider: bash
            commands:
              - echo "gpus $CUDA_VISIBLE_DEVICES nvidia $NVIDIA_VISIBLE_DEVICES"
              - sleep 600
            resources: {gpu: 1}
        """,
    )
    names = [submit(cluster, project, "one-gpu") for _ in range(8)]
    wait_for(
        lambda: all(cluster.run_info(n)["status"] == "running" for n in names),
        timeout=60,
        what="all eight jobs running at once",
    )
    seen = []
    for n in names:
        text = wait_for(functools.partial(gpu_line, cluster, n), what=f"the GPU line: {logs(cluster, n)}")
        cuda, nvidia = text.groups()
        assert cuda == nvidia and "," not in cuda
        seen.append(cuda)
    assert sorted(seen) == [str(i) for i in range(8)]
    gpus = cluster.agents_json()[0]["gpus"]
    assert all(g["busy"] and g["simulated"] for g in gpus)
    for n in names:
        cluster.cli("stop", n)
    for n in names:
        cluster.wait_status(n, {"stopped"})


def test_the_agent_removes_containers_its_predecessor_left(cluster: Cluster, dockerd: Dockerd, tmp_path: Path) -> None:
    cluster.start_coordinator()
    home = docker_agent(cluster, dockerd)
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: sleepy
            provider: bash
            commands: ["echo ready", "sleep 1000"]
        """,
    )
    name = submit(cluster, project, "sleepy")
    wait_for(lambda: "ready" in logs(cluster, name), what="the job to start")
    cluster.agents[0].kill9()
    assert len(dockerd.containers(home)) == 1  # the container outlives its agent...
    cluster.agents.clear()
    docker_agent(cluster, dockerd)  # ...until the agent with the same home comes back
    wait_for(lambda: not dockerd.containers(home), timeout=20, what="the leftover container removed")
    run = cluster.wait_status(name, {"failed"})
    assert "no longer has this job" in str(run["message"]) or "agent" in str(run["message"])


def test_the_agent_survives_the_docker_engine_restarting(cluster: Cluster, dockerd: Dockerd, tmp_path: Path) -> None:
    cluster.start_coordinator()
    home = docker_agent(cluster, dockerd)
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: sleepy
            provider: bash
            commands: ["echo ready", "sleep 1000"]
          - name: quick
            provider: bash
            commands: ["echo quick and boxed $(test -f /.dockerenv && echo yes)"]
        """,
    )
    name = submit(cluster, project, "sleepy")
    wait_for(lambda: "ready" in logs(cluster, name), what="the job to start")
    dockerd.stop(signal.SIGTERM)  # the engine stops its containers on the way down
    dockerd.start()
    run = cluster.wait_status(name, {"failed", "done", "stopped"}, timeout=90)
    assert run["status"] == "failed"
    assert "Docker engine" in str(run["message"]), run
    agent = cluster.agents[0]
    assert agent.popen.poll() is None, agent.output()[-3000:]
    assert cluster.agents_json()[0]["status"] == "online"
    r = cluster.cli("run", "quick", cwd=project)
    assert r.returncode == 0, r.stderr[-3000:] + agent.output()[-3000:]
    assert "quick and boxed yes" in r.stdout
    wait_for(lambda: not dockerd.containers(home), timeout=20, what="no container left")


def test_the_embedded_local_agent_takes_its_runtime_from_the_environment(
    local: LocalMode, dockerd: Dockerd, tmp_path: Path
) -> None:
    local.extra_env = {
        "DSTACK_RUNTIME": "docker",
        "DSTACK_DOCKER_HOST": dockerd.host,
        "DSTACK_DOCKER_IMAGE_BASH": BUSYBOX,
        "DSTACK_DOCKER_IMAGE_CUDA": BUSYBOX,
        "DSTACK_DOCKER_NETWORK": "none",
        "DSTACK_SIMULATE_GPUS": "2xA100-80GB",
    }
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: where
            provider: bash
            commands: ['test -f /.dockerenv && echo "boxed, gpus=$CUDA_VISIBLE_DEVICES"']
            resources: {gpu: {count: 2, name: a100}}
        """,
    )
    r = local.cli("run", "where", cwd=project)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "boxed, gpus=0,1" in r.stdout
    agents = json.loads(local.cli("agents", "--json", cwd=project).stdout)
    assert agents[0]["runtime"] == "docker" and all(g["simulated"] for g in agents[0]["gpus"])
