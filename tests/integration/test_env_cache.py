"""The environment cache end to end: the real CLI, a coordinator and an agent, python workflows with
requirements (a wheel made here, installed with no network), on host processes and in containers."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Cluster, write_project
from tests.dockerd import Dockerd, DockerUnavailable, debootstrap_tar
from tests.tinywheel import build_wheel, offline_requirements

pytestmark = pytest.mark.integration

WORKFLOWS = """
workflows:
  - name: uses-pkg
    provider: python
    file: main.py
    args: ["--n", "3"]
    requirements: requirements.txt
"""
MAIN_PY = "import sys, tinypkg\nprint('tinypkg', tinypkg.VALUE, 'in', sys.prefix, sys.argv[1:])\n"


def project_with_wheel(root: Path) -> Path:
    project = write_project(
        root, WORKFLOWS, {"main.py": MAIN_PY, "requirements.txt": offline_requirements("wheels", "tinypkg")}
    )
    build_wheel(project / "wheels")  # packed with the code: pip finds it next to requirements.txt
    return project


def run_twice(cluster: Cluster, project: Path) -> tuple[str, str]:
    outs = []
    for _ in range(2):
        r = cluster.cli("run", "uses-pkg", cwd=project, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert re.search(r"^tinypkg 42 in \S+ \['--n', '3'\]$", r.stdout, re.M), r.stdout
        outs.append(r.stdout)
    return outs[0], outs[1]


def test_the_second_run_reuses_the_environment_of_the_first(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("a1")
    first, second = run_twice(cluster, project_with_wheel(tmp_path / "p"))
    made = re.search(r"dstack: installing requirements \(1 packages\) into a new environment (\w+)", first)
    assert made, first
    assert "Successfully installed tinypkg-1.0" in first  # pip's output is in the log
    name = made.group(1)
    assert re.search(rf"dstack: reusing environment {name} \(created [^)]+\)", second), second
    assert "installing" not in second
    envs = cluster.tmp / "a1" / "envs"
    assert f"in {envs / name} " in first and f"in {envs / name} " in second
    assert (envs / name / "dstack-env.json").is_file()


def test_without_a_cache_each_job_makes_its_own_environment(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("a1", "--env-cache-size", "0")
    project = project_with_wheel(tmp_path / "p")
    r = cluster.cli("run", "uses-pkg", cwd=project, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "into a new environment .dstack-venv (the environment cache is off)" in r.stdout
    assert re.search(r"^tinypkg 42 in \S+/\.dstack-venv \['--n', '3'\]$", r.stdout, re.M), r.stdout
    assert not any((cluster.tmp / "a1" / "envs").iterdir())


# ---- in containers -------------------------------------------------------------------------------

# The tests' python image (tests/dockerd.py) is Debian's python3-minimal: no venv, no pip, so it
# cannot install requirements. This one adds python3-venv (Debian's venv with ensurepip's wheels).
PYTHON_VENV = "dstack-test/python-venv:3.11"


def python_venv_tar() -> Path:
    return debootstrap_tar("python-venv-3.11-bookworm-1", "python3-venv")


def load_python_venv_image(dockerd: Dockerd) -> None:
    client = dockerd.client()
    if PYTHON_VENV in {t for img in client.images.list() for t in img.tags}:
        return
    try:
        tar = python_venv_tar()
    except (DockerUnavailable, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot build {PYTHON_VENV} (debootstrap needs Debian's mirror): {e}")
    repo, tag = PYTHON_VENV.split(":")
    client.api.import_image_from_file(str(tar), repository=repo, tag=tag)


def test_the_second_run_in_a_container_reuses_the_environment(
    cluster: Cluster, dockerd: Dockerd, tmp_path: Path
) -> None:
    dockerd.load_images()
    load_python_venv_image(dockerd)
    cluster.start_coordinator()
    cluster.start_agent(
        "d1",
        "--runtime",
        "docker",
        "--docker-host",
        dockerd.host,
        "--docker-image-python",
        "dstack-test/python-venv:{version}",
        "--docker-network",
        "none",
    )
    first, second = run_twice(cluster, project_with_wheel(tmp_path / "p"))
    made = re.search(r"dstack: installing requirements \(1 packages\) into a new environment (\w+)", first)
    assert made, first
    name = made.group(1)
    assert re.search(rf"dstack: reusing environment {name} \(created [^)]+\)", second), second
    # The same path in every container (venvs are not relocatable), kept in the agent's home.
    assert f"in /var/lib/dstack/envs/{name} " in first and f"in /var/lib/dstack/envs/{name} " in second
    assert (cluster.tmp / "d1" / "envs" / name / "dstack-env.json").is_file()
    assert not dockerd.containers(cluster.tmp / "d1")
