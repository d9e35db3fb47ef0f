"""What an agent killed with SIGKILL leaves on its host, and what the next agent with the same home does with it.

Real coordinator and agent processes. The killed agent's jobs keep running (nothing on the host kills
them), in their cgroups: a job with memory and CPU limits (its own groups, named by its id, in three
hierarchies) and one without (a pooled `pool-*` group); one of their processes left its session and
cleared its environment, so that only its cgroup still says whose it is. A second agent on the same host
runs a job of its own meanwhile. The restarted agent must kill the old jobs' processes, remove their
groups and their work folders (and the unfinished downloads of the code cache), and touch nothing of the
other agent's; the coordinator fails the jobs. With a job user, the old agent's spawner is gone too.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import psutil
import pytest

from dstack.agent import jobuser
from dstack.agent.jobuser import jobs_root
from dstack.agent.runtimes.cgroups import POOL_PREFIX, ROOT, _mounts
from tests.cleanup import agent_cgroup_parents, agent_cgroup_tag
from tests.conftest import Cluster, wait_for, write_project
from tests.hostjobs import JOB_USER, job_users
from tests.integration.test_limits import host_pids_limit_possible

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or not host_pids_limit_possible(), reason="needs root and v1/v2 cgroups"),
]

# `limited` has groups of its own in the memory, cpu and pids hierarchies; `pooled` asks for no limit and
# gets a pooled group. Each prints its processes' pids: its shell's child, and one that left the session
# with an empty environment (no DSTACK_AGENT_HOME: only its cgroup names it).
JOB = """
sleep 600 &
echo "child $!"
setsid env -i sleep 601 &
echo "escaped $!"
echo "ready"
wait
"""
WORKFLOWS = f"""
workflows:
  - name: limited
    provider: bash
    commands: {JOB.strip().splitlines()!r}
    resources: {{memory: 64MiB, cpu: 2}}
  - name: pooled
    provider: bash
    commands: {JOB.strip().splitlines()!r}
  - name: bystander
    provider: bash
    commands: {JOB.strip().splitlines()!r}
    resources: {{cpu: 1}}
"""


def job_pids(cluster: Cluster, run: str) -> list[int]:
    """The job's shell's pids once it printed them: its own child and the escaped one."""

    def printed() -> list[int] | None:
        out = cluster.cli("logs", run).stdout
        if "ready" not in out:
            return None
        return [int(re.search(rf"{what} (\d+)", out).group(1)) for what in ("child", "escaped")]  # type: ignore[union-attr]

    return wait_for(printed, timeout=60, what=f"{run}'s processes")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def groups_of(pid: int) -> set[Path]:
    """The cgroup folders a process is in, under this host's cgroupfs, that are an agent's job groups."""
    mounts = _mounts()
    found = set()
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if "/dstack-" not in path:
            continue
        for mount in [ROOT] if ctrls == "" else [mounts[c] for c in ctrls.split(",") if c in mounts]:
            found.add(mount / path.lstrip("/"))
    return found


def tree(home: Path) -> dict[Path, list[str]]:
    """An agent's group in each hierarchy -> the groups in it (its jobs')."""
    tag = agent_cgroup_tag(home)
    return {
        p / tag: sorted(c.name for c in (p / tag).iterdir() if c.is_dir())
        for p in agent_cgroup_parents()
        if (p / tag).is_dir()
    }


@pytest.fixture(params=job_users())
def jobs_as(request: pytest.FixtureRequest, tmp_path: Path) -> list[str]:
    """The agent's --job-user: none (jobs as root), or the job user (jobs started by its spawner)."""
    if request.param != JOB_USER:
        return ["--job-user", "none"]
    for folder in (tmp_path, *tmp_path.parents):  # as /var/lib/dstack is: passable for the job user
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
    return ["--job-user", jobuser.DEFAULT]


def test_a_restarted_agent_leaves_nothing_of_its_killed_predecessors_jobs(
    cluster: Cluster, tmp_path: Path, jobs_as: list[str]
) -> None:
    cluster.start_coordinator()
    victim = cluster.start_agent("victim", *jobs_as)
    home = cluster.tmp / "victim"
    project = write_project(tmp_path / "p", WORKFLOWS)
    runs = {}
    for workflow in ("limited", "pooled"):
        r = cluster.cli("run", "-d", workflow, cwd=project)
        assert r.returncode == 0, r.stderr
        runs[workflow] = r.stdout.strip()
    old = {w: job_pids(cluster, run) for w, run in runs.items()}
    # Another agent on the host, with a job of its own (the victim's CPUs are all taken by `limited`).
    cluster.start_agent("bystander", *jobs_as)
    r = cluster.cli("run", "-d", "bystander", cwd=project)
    assert r.returncode == 0, r.stderr
    other_run = r.stdout.strip()
    other = job_pids(cluster, other_run)
    assert {j["agent"] for w in runs for j in cluster.run_info(runs[w])["jobs"]} == {"victim"}
    assert cluster.run_info(other_run)["jobs"][0]["agent"] == "bystander"
    other_groups = set().union(*(groups_of(p) for p in other))
    other_tree = tree(cluster.tmp / "bystander")
    workdirs = [d for d in (home / "jobs", jobs_root(home)) if d.is_dir() and any(d.iterdir())]

    # The job user's spawner (agent/spawner.py), with --job-user: a child of the agent's, as that user.
    spawners = [c.pid for c in psutil.Process(victim.popen.pid).children() if c.uids().real != 0]
    assert bool(spawners) == (jobs_as[1] != "none"), spawners
    victim.kill9()
    # Killed mid-download, it leaves its unfinished code files (agent/code.py, storage/transfer.py).
    partial = [home / "code" / ".part-x1y2z3", home / "code" / ".0a1b.tar.gz.0badf00d.part"]
    for f in partial:
        f.write_bytes(b"half")
    old_pids = [p for pids in old.values() for p in pids]
    old_groups = set().union(*(groups_of(p) for p in old_pids))
    assert all(alive(p) for p in old_pids)  # nothing on the host kills a dead agent's jobs...
    assert any(g.name.startswith(POOL_PREFIX) for g in old_groups), old_groups
    assert len(old_groups) >= 4, old_groups  # memory, cpu and pids groups of one job, a pooled pids group
    assert workdirs, "the jobs' work folders"

    cluster.start_agent("victim", *jobs_as)  # ...until the agent with that home comes back
    for run in runs.values():
        done = cluster.wait_status(run, {"failed"}, timeout=60)
        assert done["termination_reason"] in ("agent lost", "executor error"), done
    wait_for(lambda: not any(alive(p) for p in old_pids), timeout=30, what="the old jobs' processes killed")
    assert not [g for g in old_groups if g.exists()]
    assert all(children == [] for children in tree(home).values()), tree(home)  # its groups: none of a job
    assert not [f for f in partial if f.exists()]
    assert not any(alive(p) for p in spawners)
    # Their work folders: removed off the start path.
    wait_for(lambda: not [e for d in workdirs for e in d.iterdir() if e.name != jobuser.ENVS], what="folders gone")

    # The other agent's job runs on, in its groups.
    assert all(alive(p) for p in other), "the other agent's job was killed"
    assert all(g.exists() for g in other_groups)
    assert tree(cluster.tmp / "bystander") == other_tree
    assert cluster.run_info(other_run)["status"] == "running"
