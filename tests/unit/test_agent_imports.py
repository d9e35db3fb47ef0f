"""An agent of the host or null runtime starts without the Docker SDK: importing it (docker, requests, urllib3)
costs about 0.15 s of CPU per agent start, and the test suite alone starts agents some 150 times."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DOCKER_ONLY = ("docker", "requests", "urllib3")

PROBE = """
import sys
from dstack.agent.main import main  # everything an agent imports before it knows its runtime
from dstack.agent.runtimes import DockerOptions, make_runtime, resolve_runtime

assert resolve_runtime("host", DockerOptions()) == "host"
make_runtime("host", 1.0)
make_runtime("null", 1.0)
print(" ".join(m for m in {mods!r} if m in sys.modules))
"""


def test_a_host_or_null_agent_never_imports_the_docker_sdk() -> None:
    r = subprocess.run(
        [sys.executable, "-c", PROBE.format(mods=DOCKER_ONLY)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [], f"imported by a host agent: {r.stdout.strip()}"


def test_auto_still_asks_the_docker_engine(tmp_path: Path) -> None:
    """The engine check imports the SDK when `auto` asks for it: no engine at this socket, so host."""
    from dstack.agent.runtimes import DockerOptions, resolve_runtime

    assert resolve_runtime("auto", DockerOptions(base_url=f"unix://{tmp_path}/no-engine.sock")) == "host"
