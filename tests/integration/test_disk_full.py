"""A full agent disk, with real processes (issue 16): an agent whose home is a small tmpfs (in a private mount
namespace of its own: it goes with the agent, nothing is mounted on the host).

Attacks run here:
- a job whose code does not fit on the agent's disk (ENOSPC unpacking it): its attempt ends with the
  infrastructure reason `agent disk full on small: N MiB free in ...`, not as the user's fault nor as a
  store error naming the S3 URL, and it runs on the healthy agent;
- the agent's disk filled behind its back: `dstack agents` shows it draining, new jobs go to the healthy
  agent only, and once the space is back the agent takes jobs again by itself.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import closing
from pathlib import Path

import pytest

from dstack.protos.v1 import client_pb2, common_pb2
from tests.conftest import Cluster, Proc, wait_for, write_project

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"),
]

DISK_MIB = 16
FLOOR = "4MiB"
DISK_FULL = common_pb2.TERMINATION_REASON_DISK_FULL
WORKFLOWS = """
workflows:
  - name: hello
    provider: bash
    commands:
      - echo "hello from $JOB_HOSTNAME"
"""


def small_disk_agent(cluster: Cluster, name: str) -> Proc:
    """An agent whose home is a DISK_MIB tmpfs, mounted in a mount namespace of its own (gone with it)."""
    home = cluster.tmp / name
    home.mkdir(parents=True, exist_ok=True)
    mount = f'mount -t tmpfs -o size={DISK_MIB}m,mode=0700 tmpfs "$0" && exec "$@"'
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, str(home)]
    return cluster.start_agent(name, "--min-free-disk", FLOOR, prefix=prefix)


def seen(agent: Proc, path: Path) -> Path:
    """`path` as the agent sees it (its tmpfs), from here."""
    return Path(f"/proc/{agent.popen.pid}/root") / path.relative_to("/")


def fill(path: Path) -> None:
    chunk = b"\0" * (1 << 20)
    with path.open("ab", buffering=0) as f:
        while len(chunk) >= 4096:
            try:
                f.write(chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                chunk = chunk[: len(chunk) // 2]


def inventory(cluster: Cluster, name: str) -> common_pb2.Inventory | None:
    """Agent `name`'s inventory as the pool lists it (asked in-process: a CLI process per poll costs more)."""
    with closing(cluster.client()) as client:
        return next((a.inventory for a in client.list_agents() if a.name == name), None)


def draining(cluster: Cluster, name: str) -> bool:
    inv = inventory(cluster, name)
    return inv is not None and inv.disk_full


def job_of(cluster: Cluster, run: str) -> client_pb2.Job:
    with closing(cluster.client()) as client:
        (job,) = client.get_run(run).jobs
    return job


def test_a_full_agent_disk_requeues_its_job_elsewhere_drains_the_agent_and_it_recovers(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.start_coordinator()
    small = small_disk_agent(cluster, "small")

    # 1. Code that fits the disk packed but not unpacked as well: the unpack meets ENOSPC. Only `small` is
    # there for attempt 1. Its code cache then keeps it below its floor: it drains, and the next attempt waits.
    project = write_project(tmp_path / "p", WORKFLOWS)
    (project / "weights.bin").write_bytes(os.urandom(13 << 20))  # incompressible: 13 MiB packed, 13 unpacked
    r = cluster.cli("run", "hello", "-d", cwd=project)
    assert r.returncode == 0, r.stderr
    (run,) = [str(x["name"]) for x in cluster.runs()]

    def ended_by_disk() -> list[client_pb2.JobAttempt]:
        return [a for a in job_of(cluster, run).attempts if a.termination_reason == DISK_FULL]

    (first,) = wait_for(ended_by_disk, timeout=90, what="an attempt ended by the full disk")
    assert first.agent_name == "small" and first.status == common_pb2.JOB_STATUS_FAILED, first
    assert first.message.startswith("agent disk full on small: ") and " MiB free in " in first.message, first
    assert "http" not in first.message and "store" not in first.message.lower(), first  # not the store's fault

    wait_for(lambda: draining(cluster, "small"), timeout=60, what="small to drain")
    (agent,) = [a for a in cluster.agents_json() if a["name"] == "small"]  # as `dstack agents --json` says it
    assert agent["draining"] == "disk full" and agent["disk_free_bytes"] < 4 << 20, agent
    table = cluster.cli("agents")
    assert table.returncode == 0 and "draining" in table.stdout and "full" in table.stdout, table.stdout
    job = job_of(cluster, run)
    assert job.status in (common_pb2.JOB_STATUS_SUBMITTED, common_pb2.JOB_STATUS_PENDING), job
    assert "draining: disk full" in job.message, job

    cluster.start_agent("healthy")
    done = cluster.wait_status(run, {"done", "failed", "stopped"}, timeout=120)
    assert done["status"] == "done", done
    assert job_of(cluster, run).agent_name == "healthy"
    assert "agent disk full on small" in small.output()

    # 2. Space back (an admin clears the code cache): the agent takes jobs again by itself.
    for cached in seen(small, cluster.tmp / "small" / "code").glob("*.tar.gz"):
        cached.unlink()
    wait_for(lambda: not draining(cluster, "small"), timeout=60, what="small to take jobs again")
    wait_for(lambda: "disk space is back" in small.output(), timeout=30, what="the agent to say so")

    # 3. Filled behind its back (another process): it drains again without any job failing, and recovers.
    filler = seen(small, cluster.tmp / "small" / "filler")
    fill(filler)
    wait_for(lambda: draining(cluster, "small"), timeout=60, what="small to drain")
    filler.unlink()
    wait_for(lambda: not draining(cluster, "small"), timeout=60, what="small to recover")
