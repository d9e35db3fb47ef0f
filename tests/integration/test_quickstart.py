"""The README's quick start, literally, as a new user takes it: a fresh clone (of what is committed), the
README's own install command (an editable install into the clone's .venv), the example run, `dstack local
stop`, and two more runs. A bug once showed only on this path (the editable install + a restart)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import search

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def readme_quick_start() -> str:
    """The first command of the README's quick start section, as written there."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    return search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()


def test_readme_quick_start_from_a_fresh_clone_survives_local_stop(tmp_path: Path) -> None:
    clone = tmp_path / "dstack"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSTACK_", "AWS_", "VIRTUAL_ENV", "PYTHON"))}
    # A new user's HOME (so ~/.dstack is new too), the system's PATH without our virtualenv; pip may reuse
    # the machine's download cache.
    env["PIP_CACHE_DIR"] = os.environ.get("PIP_CACHE_DIR") or str(Path("~/.cache/pip").expanduser())
    env["HOME"] = str(home)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "/.venv/" not in p + "/")
    dstack = clone / ".venv" / "bin" / "dstack"
    example = clone / "examples" / "hello"

    def dstack_cmd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(dstack), *args], cwd=example, env=env, capture_output=True, text=True, timeout=300)

    try:
        first = subprocess.run(
            ["bash", "-c", readme_quick_start()], cwd=clone, env=env, capture_output=True, text=True, timeout=900
        )
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert "epoch 3: loss=" in first.stdout and "saved model/weights.json" in first.stdout
        assert (home / ".dstack" / "local").is_dir()

        stopped = dstack_cmd("local", "stop")
        assert stopped.stdout.strip() == "stopped: agent, coordinator", stopped.stderr

        again = dstack_cmd("run", "train")
        assert again.returncode == 0, again.stderr
        assert "epoch 3: loss=" in again.stdout
        third = dstack_cmd("run", "train")
        assert third.returncode == 0, third.stderr
        assert "uploaded" not in third.stderr  # unchanged code is not sent again
        ps = dstack_cmd("ps", "-a")
        assert ps.stdout.count(" done ") >= 3, ps.stdout
    finally:
        if dstack.exists():
            dstack_cmd("local", "stop")
