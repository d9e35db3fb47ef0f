"""Limits against real processes: a fork bomb under the pids limit (host runtime on cgroup v1, and in a
Docker container) leaves the agent healthy, and a user flooding the queue gets a clear refusal.

The bomb is bounded-safe: it first checks from inside the job that its pids limit is in place (the
pids.max of its own group reads the agent's --pids-limit) and exits early otherwise, so a broken limit
never bombs the machine the tests run on; it also runs under `timeout`, which kills its process group.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from dstack.agent.runtimes.cgroups import (
    ROOT,
    _mounts,
    _own_groups,
    host_pids_budget,
    is_unified,
    pids_events_of,
    pids_limit_hits,
)
from dstack.protos.v1 import client_pb2, client_pb2_grpc
from tests.conftest import Cluster, search, wait_for, write_project
from tests.dockerd import BUSYBOX, Dockerd

pytestmark = pytest.mark.integration

PIDS_LIMIT = 64
BOMB_TIMEOUT_S = 240  # the bomb's own bound, far beyond what the test needs: it is stopped long before
# The job's pids.max: a container's own v2 namespace, the job's v2 group on the host, the job's v1 group
# on the host, or a v1 container's group (Docker mounts it at the hierarchy's root).
BOMB_SH = f"""
g=$(grep -E '^[0-9]+:pids:' /proc/self/cgroup | cut -d: -f3)
u=$(grep -E '^0::' /proc/self/cgroup | cut -d: -f3)
for f in /sys/fs/cgroup/pids.max "/sys/fs/cgroup$u/pids.max" \\
         "/sys/fs/cgroup/pids$g/pids.max" /sys/fs/cgroup/pids/pids.max; do
  [ -f "$f" ] && break
done
limit=$(cat "$f" 2>/dev/null || echo none)
echo "group $(dirname "$f") limit $limit"
if [ "$limit" != "{PIDS_LIMIT}" ]; then echo "no pids limit in place: not bombing"; exit 3; fi
echo bombing
exec 2>/dev/null  # failed forks would fill the log (another attack, not this test's)
# Each process forks itself again whenever its child is gone (or its fork failed): the group stays full
# and keeps forking, whichever way the shell handles a failed fork (dash and busybox exit, bash retries).
exec timeout -s KILL {BOMB_TIMEOUT_S} sh -c 'b() {{ while :; do b & wait; done; }}; b & b & wait'
"""
WORKFLOWS = """
workflows:
  - name: bomb
    provider: bash
    commands: ["sh bomb.sh"]
  - name: after
    provider: bash
    commands: ["echo still fine; for i in 1 2 3 4 5 6 7 8; do sleep 0.1 & done; wait; echo forked 8"]
"""


def host_pids_limit_possible() -> bool:
    """A writable v1 pids hierarchy, or v2 with the pids controller delegated to this process's group."""
    if is_unified():
        own = ROOT / _own_groups().get("", "/").lstrip("/")
        try:
            return "pids" in (own / "cgroup.controllers").read_text().split() and os.access(own, os.W_OK)
        except OSError:
            return False
    mount = _mounts().get("pids")
    if mount is None:
        return False
    probe = mount / "dstack-probe"
    try:
        probe.mkdir(exist_ok=True)
        probe.rmdir()
        return True
    except OSError:
        return False


def last_heartbeat_ns(cluster: Cluster, name: str) -> int:
    with cluster.channel() as ch:
        stub = client_pb2_grpc.ClientServiceStub(ch)
        resp = stub.ListAgents(
            client_pb2.ListAgentsRequest(), metadata=[("authorization", f"Bearer {cluster.admin_token}")], timeout=10
        )
    agent = next(a for a in resp.agents if a.name == name)
    assert agent.status == "online", agent
    return int(agent.last_heartbeat_ns)


def logs(cluster: Cluster, name: str) -> str:
    return cluster.cli("logs", name).stdout


def start_bomb(cluster: Cluster, project: Path) -> str:
    r = cluster.cli("run", "-d", "bomb", cwd=project)
    assert r.returncode == 0, r.stderr
    name = r.stdout.strip()
    text = wait_for(lambda: t if "bombing" in (t := logs(cluster, name)) or "not bombing" in t else None)
    assert "not bombing" not in text, text
    return name


def survives_the_bomb(cluster: Cluster, agent: str, name: str, group: Path, project: Path) -> None:
    """The bomb fills its group up to the limit and keeps failing forks; the agent heartbeats on, `dstack
    stop` ends the job with every process of it, and the next job runs."""
    wait_for(
        lambda: int((group / "pids.current").read_text()) >= PIDS_LIMIT - 2,
        timeout=30,
        what=f"the bomb to fill its group {group} up to the limit ({logs(cluster, name)!r})",
    )
    wait_for(lambda: pids_limit_hits(group / "pids.events") > 0, timeout=30, what="forks to fail on the limit")
    assert int((group / "pids.current").read_text()) <= PIDS_LIMIT
    # The agent keeps its lease while the bomb runs: its heartbeats go on (3 of them, at 0.5 s each).
    since = last_heartbeat_ns(cluster, agent)
    wait_for(lambda: last_heartbeat_ns(cluster, agent) > since + int(1.5e9), timeout=20, what="the agent's heartbeats")
    assert cluster.agents_json()[0]["status"] == "online"
    r = cluster.cli("stop", name)
    assert r.returncode == 0, r.stderr
    run = cluster.wait_status(name, {"stopped", "failed"}, timeout=60)
    assert run["status"] == "stopped", run
    wait_for(lambda: not group.exists() or not (group / "cgroup.procs").read_text().split(), what="no pid left")
    assert "dstack: the job hit its pids limit (64): fork failed" in logs(cluster, name)
    r = cluster.cli("run", "after", cwd=project)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "still fine" in r.stdout and "forked 8" in r.stdout


@pytest.mark.skipif(not host_pids_limit_possible(), reason="no writable cgroup pids controller here")
def test_a_fork_bomb_in_a_host_job_stays_in_its_pids_limit(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("h1", "--pids-limit", str(PIDS_LIMIT))
    project = write_project(tmp_path / "p", WORKFLOWS, {"bomb.sh": BOMB_SH})
    name = start_bomb(cluster, project)
    group = Path(search(r"group (\S+) limit", logs(cluster, name)).group(1))
    assert group.parent.name.startswith("dstack-") and (group / "pids.max").read_text().strip() == str(PIDS_LIMIT)
    # All of the agent's jobs together are bounded too, below the host's pid space.
    assert (group.parent / "pids.max").read_text().strip() == str(max(PIDS_LIMIT, host_pids_budget()))
    survives_the_bomb(cluster, "h1", name, group, project)
    # The job's group is removed with it (after its final update: off the job's path).
    wait_for(lambda: not group.exists(), timeout=30, what=f"the job's group {group} to be removed")
    marker = str(cluster.tmp / "h1")

    def left() -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("DSTACK_AGENT_HOME") == marker:
                    out.append(p)
            except psutil.Error:
                pass
        return out

    wait_for(lambda: not left(), timeout=10, what="no process of the job left on the host")
    # A stopping agent removes its jobs' parent groups: agents come and go without a trace in cgroupfs.
    cluster.agents[0].terminate()
    assert not group.parent.exists()


def test_a_fork_bomb_in_a_container_stays_in_its_pids_limit(cluster: Cluster, dockerd: Dockerd, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent(
        "d1",
        "--runtime",
        "docker",
        "--docker-host",
        dockerd.host,
        "--docker-image-bash",
        BUSYBOX,
        "--docker-network",
        "none",
        "--pids-limit",
        str(PIDS_LIMIT),
    )
    home = cluster.tmp / "d1"
    project = write_project(tmp_path / "p", WORKFLOWS, {"bomb.sh": BOMB_SH})
    name = start_bomb(cluster, project)
    (container,) = dockerd.containers(home)
    assert container.attrs["HostConfig"]["PidsLimit"] == PIDS_LIMIT
    events = pids_events_of(int(container.attrs["State"]["Pid"]), str(container.id))
    if events is None:
        pytest.skip("this host's pids controller is not visible to the test")
    survives_the_bomb(cluster, "d1", name, events.parent, project)
    wait_for(lambda: not dockerd.containers(home), timeout=30, what="the bomb's container to be removed")


def test_a_user_over_the_queued_limit_gets_a_clear_refusal(cluster: Cluster, tmp_path: Path) -> None:
    """No agent: runs stay queued. The CLI prints the coordinator's message, no traceback, and fails."""
    cluster.start_coordinator("--max-queued-per-user", "2", "--max-submissions-per-minute", "0")
    project = write_project(tmp_path / "p", "workflows:\n  - {name: w, provider: bash, commands: [echo hi]}\n")
    for _ in range(2):
        assert cluster.cli("run", "-d", "w", cwd=project).returncode == 0
    r = cluster.cli("run", "-d", "w", cwd=project)
    assert r.returncode != 0
    assert "you have 2 queued job(s), the limit is 2 (--max-queued-per-user): wait for some to start or stop some" in (
        " ".join(r.stderr.split())
    ), r.stderr
    assert "Traceback" not in r.stderr
    assert len(cluster.runs()) == 2


def test_a_user_submitting_too_fast_is_told_when_to_try_again(cluster: Cluster, tmp_path: Path) -> None:
    # One per minute: the second submission, seconds after the first, finds the bucket empty.
    cluster.start_coordinator("--max-submissions-per-minute", "1")
    project = write_project(tmp_path / "p", "workflows:\n  - {name: w, provider: bash, commands: [echo hi]}\n")
    assert cluster.cli("run", "-d", "w", cwd=project).returncode == 0
    r = cluster.cli("run", "-d", "w", cwd=project)
    assert r.returncode != 0
    text = " ".join(r.stderr.split())
    expected = "faster than the limit of 1 per minute, in bursts of up to 1 (--max-submissions-per-minute): try again"
    assert expected in text, r.stderr
    assert "Traceback" not in r.stderr
