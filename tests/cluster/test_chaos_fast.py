"""Issue 16's fast chaos subset on the multi-host bed (tests/cluster/bed.py): real coordinator, weed and agent
processes, each on a host of its own (network and mount namespaces), 50 one-job runs with logs and artifacts
per scenario, every invariant checked (tests/cluster/invariants.py). The full set, 1,000 jobs each, is
`python -m bench.chaos`.

Attacks run here:
- agents killed with SIGKILL mid-run and restarted: their jobs requeued once each, nothing lost or doubled;
- the coordinator killed with SIGKILL and restarted while jobs run and log: no run, line or artifact lost;
- mixed: a third of the agents cut off from the coordinator, another agent killed, the coordinator killed
  and restarted, all at once: the cut-off agents stop their jobs themselves, none runs twice at once;
- the three scenarios share one bed, in sequence (each checks only its own runs, evidence and agent-log
  lines, and leaves the bed healed for the next);
- a bed left behind by a crashed run (its owner gone) is removed by the next one, tmpfs and veths included.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import bed as bedmod
from tests.cluster.bed import BedConfig, ChaosBed, available, cleanup_stale
from tests.cluster.scenarios import SharedBed, table
from tests.cluster.workload import JobShape

pytestmark = [pytest.mark.integration, pytest.mark.skipif(available() is not None, reason=str(available()))]

JOBS = 50
CONFIG = BedConfig(agents=3, lease_timeout=5.0, heartbeat=1.0)


@pytest.fixture(scope="module")
def shared_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedBed]:
    """One bed for the scenarios below, in sequence (each bed costs its processes' starts and stops: CI's
    time). Each scenario checks only its own runs, evidence and agent-log lines, and leaves the bed healed;
    a bed it broke beyond that is replaced before the next (SharedBed.get)."""
    shared = SharedBed(tmp_path_factory.mktemp("chaos-bed"), CONFIG)
    try:
        yield shared
    finally:
        shared.close()


@pytest.mark.parametrize(
    "scenario",
    # agent-disk-full: no job fails (the agent drains, its ended attempts run elsewhere); minutes, so `long`.
    ["agent-kill", "coordinator-kill", "mixed", pytest.param("agent-disk-full", marks=pytest.mark.long)],
)
def test_invariants_hold_under_faults(scenario: str, shared_bed: SharedBed, tmp_path: Path) -> None:
    result = shared_bed.run(scenario, tmp_path / scenario, JOBS, JobShape(), outage=8.0, finish_timeout=240.0)
    v = result.verdict
    where = f"bed: {shared_bed.bed.root if shared_bed.bed else shared_bed.root}, scenario: {tmp_path / scenario}"
    shown = f"{table([result])}\nfaults: {result.fault_log}\n{where}\n" + "\n".join(v.details)
    assert not result.error, shown
    assert result.faults >= 1, shown
    assert v.lost == v.not_terminal == v.wrong_reason == v.false_agent_lost == 0, shown
    assert v.gpu_conflicts == v.lines_lost == v.lines_duplicated == v.artifact_mismatches == 0, shown
    # Only an agent a fault cut off may stop its jobs itself: a coordinator restart or a slow store may not.
    assert v.healthy_fenced == 0, shown
    assert v.done + v.failed_allowed == JOBS, shown
    # A cut-off agent stops its jobs itself once its lease runs out, before the coordinator requeues them
    # (docs/lifecycle.md, "Self-fencing"): no job runs twice at once, the mixed scenario included.
    assert v.duplicated == 0, shown


def test_a_bed_left_by_a_crashed_run_is_removed_by_the_next(tmp_path: Path) -> None:
    """The owner of a bed dies without closing it (SIGKILL): namespaces, the mount namespace holding a tmpfs,
    and the root's veth are still there; the next bed's cleanup removes them all, and leaves live beds be."""
    crashed = ChaosBed(tmp_path / "crashed", BedConfig(agents=0))
    live = ChaosBed(tmp_path / "live", BedConfig(agents=0))
    try:
        for b in (crashed, live):
            bedmod.OWNERS.mkdir(parents=True, exist_ok=True)
            b._network()
            b._add_host("coordinator", tmpfs=b.state_dir, size_mib=4)
        (live.hosts["coordinator"].seen(live.state_dir) / "x").write_text("live")
        dead = subprocess.Popen(["true"])
        dead.wait()
        (bedmod.OWNERS / crashed.tag).write_text(f"{dead.pid} 0\n")
        started = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
        (bedmod.OWNERS / live.tag).write_text(f"{os.getpid()} {started}\n")
        holder = crashed.hosts["coordinator"].holder

        removed = cleanup_stale()

        assert crashed.tag in removed and live.tag not in removed
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert bedmod.PREFIX + crashed.tag not in netns
        assert bedmod.PREFIX + live.tag in netns
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert f"{bedmod.PREFIX}{crashed.tag}@" not in links and f"{bedmod.PREFIX}{live.tag}@" in links
        assert holder.wait(10) == -9  # the tmpfs went with its mount namespace
        assert (live.hosts["coordinator"].seen(live.state_dir) / "x").read_text() == "live"
    finally:
        crashed.close()
        live.close()
