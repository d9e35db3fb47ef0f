"""The host-process runtime: GPU pinning, cgroup v1 limits, what escapes the session dies with the job,
and the curl provider (host runtime: the host's curl or wget)."""

from __future__ import annotations

import functools
import http.server
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from dstack.agent.runtimes.cgroups import _mounts
from tests.conftest import Cluster, search, wait_for, write_project

pytestmark = pytest.mark.integration


LIMITS_SH = """
mem=$(grep -E '^[0-9]+:([^:]*,)?memory(,[^:]*)?:' /proc/self/cgroup | cut -d: -f3)
cpu=$(grep -E '^[0-9]+:([^:]*,)?cpu(,[^:]*)?:' /proc/self/cgroup | cut -d: -f3)
echo "memory $(cat /sys/fs/cgroup/memory$mem/memory.limit_in_bytes)"
echo "quota $(cat /sys/fs/cgroup/cpu$cpu/cpu.cfs_quota_us)"
echo "gpus $CUDA_VISIBLE_DEVICES"
setsid sleep 1002 &
echo "escaped $!"
"""


def cgroup_v1_writable() -> bool:
    mounts = _mounts()
    if not {"memory", "cpu"} <= set(mounts):
        return False
    probe = mounts["memory"] / "dstack-probe"
    try:
        probe.mkdir(exist_ok=True)
        probe.rmdir()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not cgroup_v1_writable(), reason="no writable cgroup v1 memory/cpu hierarchy here")
def test_host_jobs_get_memory_and_cpu_limits_and_lose_their_escapees(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("h1", "--simulate-gpus", "2xA100-80GB")
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: limited
            provider: bash
            commands: ["bash limits.sh"]
            resources: {memory: 48MiB, cpu: 0.25, gpu: 1}
          - name: hog
            provider: bash
            commands: ["head -c 200000000 /dev/zero | tail > /dev/null"]
            resources: {memory: 32MiB}
        """,
        {"limits.sh": LIMITS_SH},
    )
    r = cluster.cli("run", "limited", cwd=project)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"memory {48 << 20}" in r.stdout
    assert "quota 25000" in r.stdout
    assert re.search(r"gpus [01]$", r.stdout, re.M)
    escaped = int(search(r"escaped (\d+)", r.stdout).group(1))

    def gone() -> bool:
        return not psutil.pid_exists(escaped) or psutil.Process(escaped).status() == "zombie"

    wait_for(gone, timeout=10, what="the process that left the job's session to be killed with the job")
    r = cluster.cli("run", "hog", cwd=project)
    assert r.returncode == 1
    assert "out of memory: the limit is 32 MiB" in " ".join(r.stderr.split()), r.stderr[-2000:]


@pytest.fixture
def http_file(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "data.csv").write_text("a,b\n1,2\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/data.csv"
    finally:
        server.shutdown()


def test_curl_provider_saves_the_download_as_an_artifact(cluster: Cluster, tmp_path: Path, http_file: str) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    project = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: download
            provider: curl
            url: {http_file}
            output: raw/data.csv
          - name: use
            provider: bash
            depends-on: [download]
            commands: ["cat raw/data.csv"]
        """,
    )
    r = cluster.cli("run", "use", cwd=project)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "use | a,b\nuse | 1,2" in r.stdout
    name = search(r"(\S+) submitted", r.stderr).group(1)
    listed = cluster.cli("artifacts", "list", name, "--json")
    assert "raw/data.csv" in listed.stdout
    out = tmp_path / "got"
    assert cluster.cli("artifacts", "download", name, "-o", str(out)).returncode == 0
    assert (next(out.rglob("data.csv"))).read_text() == "a,b\n1,2\n"


UNLIMITED_SH = """
cat > .dstack-env-report.json <<'JSON'
{"python_version": "9.9.9", "packages": "forged==6.6.6\\n", "os": "ForgedOS"}
JSON
setsid sleep 1003 &
echo "escaped $!"
"""


def test_a_job_without_limits_loses_its_escapees_and_cannot_forge_its_record(cluster: Cluster, tmp_path: Path) -> None:
    """A job that asks for no memory or CPU limit gets no memory or cpu group (v1: one kernel group per
    job, not three), yet what leaves its session still dies with it (its pids group, or its process
    group); and a bash job's own `.dstack-env-report.json` is not read into its record: only a Python
    environment writes one."""
    cluster.start_coordinator()
    cluster.start_agent("h1")
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: plain
            provider: bash
            commands: ["bash unlimited.sh"]
        """,
        {"unlimited.sh": UNLIMITED_SH},
    )
    r = cluster.cli("run", "plain", cwd=project)
    assert r.returncode == 0, r.stderr[-3000:]
    escaped = int(search(r"escaped (\d+)", r.stdout).group(1))

    def gone() -> bool:
        return not psutil.pid_exists(escaped) or psutil.Process(escaped).status() == "zombie"

    wait_for(gone, timeout=10, what="the process that left the job's session to be killed with the job")
    (run,) = cluster.runs()
    record = json.loads(cluster.cli("show", run["name"], "--json").stdout)
    env = record["jobs"][0]["environment"]
    assert "forged" not in env["packages"] and env["python_version"] != "9.9.9", env
    assert env["os"] != "ForgedOS" and env["os"], env
