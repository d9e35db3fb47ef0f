"""Real 2022 workflow files (tests/corpus2022) with the 2022 python/bash fields run to `done` in local mode,
on the host runtime, with requirements installed from a wheel packed with the code (no network)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import Cluster, LocalMode, search, write_project
from tests.dockerd import Dockerd
from tests.integration.test_docker import docker_agent
from tests.tinywheel import build_wheel, offline_requirements

pytestmark = pytest.mark.integration
CORPUS = Path(__file__).resolve().parents[1] / "corpus2022"


def corpus_project(root: Path, corpus_file: str, files: dict[str, str]) -> Path:
    (root / ".dstack").mkdir(parents=True)
    shutil.copyfile(CORPUS / corpus_file, root / ".dstack" / "workflows.yaml")
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "requirements.txt").write_text(offline_requirements("wheels", "tinypkg"))
    build_wheel(root / "wheels")
    return root


def python310_on_path(local: LocalMode, tmp_path: Path) -> None:
    """The corpus asks for `python: 3.10` (written unquoted: YAML's 3.1); this host's Python stands in for it."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "python3.10").symlink_to(sys.executable)
    local.extra_env["PATH"] = f"{shim}:{os.environ['PATH']}"


def test_bash_python_and_requirements_from_the_official_examples(local: LocalMode, tmp_path: Path) -> None:
    """dstack-examples 9eb404e (corpus 011): `download` has `python: 3.10` and runs `pip install` itself;
    `train` has `requirements:`, installed before its commands, and uses the tagged download."""
    project = corpus_project(
        tmp_path / "p",
        "011_dstack-examples_workflows_9eb404e.yaml",
        {
            "mnist/download.py": "import os, sys, tinypkg\nos.makedirs('data', exist_ok=True)\n"
            "open('data/mnist.txt', 'w').write(tinypkg.VALUE)\n"
            "print('download with', sys.version_info[:2], 'in', sys.prefix)\n",
            "mnist/train.py": "import os, tinypkg\nos.makedirs('lightning_logs', exist_ok=True)\n"
            "print('train sees', open('data/mnist.txt').read(), 'and', tinypkg.VALUE)\n",
        },
    )
    python310_on_path(local, tmp_path)
    r = local.cli("run", "download", cwd=project, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert search(r"download with \(3, \d+\) in \S*\.dstack-venv", r.stdout)
    run = search(r"(\S+) submitted", r.stderr).group(1)
    t = local.cli("tags", "add", "mnist_data", run, cwd=project)
    assert t.returncode == 0, t.stderr
    r = local.cli("run", "train", cwd=project, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "installing requirements" in r.stdout and "Successfully installed tinypkg-1.0" in r.stdout
    assert "train sees 42 and 42" in r.stdout


def test_python_script_from_the_official_examples(local: LocalMode, tmp_path: Path) -> None:
    """dstack-examples c4cbb8b (corpus 006, April 2022): `python_script` and `requirements`, and
    `depends-on` passing the download's artifact to the training."""
    project = corpus_project(
        tmp_path / "p",
        "006_dstack-examples_workflows_c4cbb8b.yaml",
        {
            "download.py": "import os, tinypkg\nos.makedirs('data', exist_ok=True)\n"
            "open('data/d.txt', 'w').write('digits')\n",
            "train.py": "import os, sys, tinypkg\nos.makedirs('model', exist_ok=True)\n"
            "print('trained on', open('data/d.txt').read(), 'with', tinypkg.VALUE, sys.argv[1:])\n",
        },
    )
    r = local.cli("run", "train-mnist", "--epochs", "2", cwd=project, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "trained on digits with 42 ['--epochs', '2']" in r.stdout
    run = search(r"(\S+) submitted", r.stderr).group(1)
    ps = local.cli("ps", "-a", cwd=project)
    assert run in ps.stdout and "done" in ps.stdout


def test_bash_python_picks_the_image_of_that_version_in_a_container(
    cluster: Cluster, dockerd: Dockerd, tmp_path: Path
) -> None:
    """On a container runtime, bash `python: 3.11` runs in the Python image of that version. The tests' image is
    a bare python3-minimal (no venv, no pip): `python` is still that version."""
    dockerd.load_images(python=True)
    cluster.start_coordinator()
    docker_agent(cluster, dockerd)
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: b
            provider: bash
            python: 3.11
            commands:
              - python main.py
        """,
        {"main.py": "import os, sys\nprint('python', sys.version_info[:2], os.path.exists('/.dockerenv'))\n"},
    )
    r = cluster.cli("run", "b", cwd=project, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "python (3, 11) True" in r.stdout
