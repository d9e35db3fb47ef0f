"""Bounded agents with real processes: a job printing millions of lines neither makes its agent lost nor
disturbs another agent's job, and while the coordinator is away the agent's memory stays bounded (lines
spool to disk, then the job's output waits) and every line arrives once when it is back."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import PY, Cluster, wait_for, write_project

pytestmark = pytest.mark.integration


def logs_to_file(cluster: Cluster, name: str, path: Path) -> None:
    """`dstack logs NAME` into a file: millions of lines are not held in the test's memory."""
    with path.open("wb") as f:
        r = subprocess.run(
            [PY, "-m", "dstack.cli", "logs", name], stdout=f, stderr=subprocess.PIPE, env=cluster.env(), timeout=900
        )
    assert r.returncode == 0, r.stderr[-2000:]


def lines_of(path: Path) -> Iterator[str]:
    with path.open() as f:
        for line in f:
            yield line.rstrip("\n")


def check_sequence(path: Path, expected: Iterator[str]) -> int:
    """Every expected line once, in order, and nothing else; returns how many."""
    n = 0
    for n, (got, want) in enumerate(zip(lines_of(path), expected, strict=True), start=1):
        assert got == want, f"line {n}: {got!r}, expected {want!r}"
    return n


def never_lost(cluster: Cluster) -> None:
    assert cluster.coordinator is not None
    assert "lease ran out" not in cluster.coordinator.output()
    assert {a["name"]: a["status"] for a in cluster.agents_json()} == {"loud": "online", "quiet": "online"}


# The 5,000,000 lines take 4-8 minutes on a 2-core machine: run on demand (`pytest -m long`);
# .ci/run keeps a tenth of it, still minutes of heartbeats competing with the log.
@pytest.mark.parametrize("lines", [pytest.param(5_000_000, marks=pytest.mark.long), 500_000])
def test_a_job_printing_5m_lines_loses_no_agent_and_no_line(cluster: Cluster, tmp_path: Path, lines: int) -> None:
    cluster.start_coordinator()
    cluster.start_agent("loud", "--max-jobs", "1")
    project = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: loud
            provider: bash
            commands: ["seq 1 {lines}"]
          - name: quiet
            provider: bash
            commands: ["echo started", "sleep 600"]
        """,
    )
    r = cluster.cli("run", "-d", "loud", cwd=project)
    assert r.returncode == 0, r.stderr
    loud = r.stdout.strip()
    cluster.wait_status(loud, {"running", "done", "failed"})
    # The loud agent takes one job at a time: the quiet one goes to the other agent.
    cluster.start_agent("quiet")
    r = cluster.cli("run", "-d", "quiet", cwd=project)
    assert r.returncode == 0, r.stderr
    quiet = r.stdout.strip()
    run = cluster.wait_status(loud, {"done", "failed"}, timeout=900)
    assert run["status"] == "done", run
    never_lost(cluster)
    assert cluster.run_info(quiet)["status"] == "running"
    out = tmp_path / "loud-job-output.log"  # not loud.log: the agent named loud logs there
    logs_to_file(cluster, loud, out)
    assert check_sequence(out, (str(i) for i in range(1, lines + 1))) == lines
    never_lost(cluster)
    assert cluster.cli("stop", quiet).returncode == 0


AWAY_LINES = 2_000_000
PAD = "x" * 24


def test_the_agent_stays_bounded_while_the_coordinator_is_away_and_every_line_arrives_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.start_coordinator()
    agent = cluster.start_agent("agent-1", "--outbox-memory", "4MiB", "--max-job-outbox-bytes", "16MiB")
    project = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: chatty
            provider: bash
            commands: ["echo first", "seq -f 'line %.0f {PAD}' 1 {AWAY_LINES}"]
        """,
    )
    r = cluster.cli("run", "-d", "chatty", cwd=project)
    assert r.returncode == 0, r.stderr
    name = r.stdout.strip()
    wait_for(lambda: "first" in cluster.cli("logs", name).stdout, timeout=60, what="the job to print")
    assert cluster.coordinator is not None
    ended = agent.output().count("session with the coordinator")
    cluster.coordinator.kill9()
    wait_for(lambda: agent.output().count("session with the coordinator") > ended, what="the agent to notice")
    proc = psutil.Process(agent.popen.pid)
    peak = 0

    def paused() -> bool:
        nonlocal peak
        peak = max(peak, proc.memory_info().rss)
        return "its output waits for the coordinator" in agent.output()

    wait_for(paused, timeout=300, interval=0.2, what="the job's output to wait for the coordinator")
    spool = cluster.tmp / "agent-1" / "outbox"
    on_disk = sum(f.stat().st_size for f in spool.rglob("*") if f.is_file())
    samples = 0

    def sampled() -> bool:  # RSS for a while longer: the job is paused, the agent does not grow
        nonlocal peak, samples
        peak, samples = max(peak, proc.memory_info().rss), samples + 1
        return samples >= 20

    wait_for(sampled, interval=0.2)
    mib = 2**20
    print(f"agent RSS peak while the coordinator was away: {peak / mib:.1f} MiB; spool {on_disk / mib:.1f} MiB")
    assert on_disk > 0  # lines beyond memory went to disk
    # The job has printed far more than 4 MiB: memory held the bound (plus the interpreter's own ~100 MiB).
    assert peak < 250 * 2**20, peak
    cluster.start_coordinator()
    run = cluster.wait_status(name, {"done", "failed"}, timeout=900)
    assert run["status"] == "done", run
    out = tmp_path / "chatty-job-output.log"
    logs_to_file(cluster, name, out)
    expected = iter(["first", *(f"line {i} {PAD}" for i in range(1, AWAY_LINES + 1))])
    assert check_sequence(out, expected) == AWAY_LINES + 1
    assert not any(f.is_file() for f in spool.rglob("*"))  # the spool is gone once everything is acknowledged


@pytest.mark.parametrize("step_s", [60, -60])
def test_a_wall_clock_step_on_the_coordinator_leaves_every_healthy_agent_online(
    cluster: Cluster, tmp_path: Path, step_s: int
) -> None:
    """The coordinator's wall clock (only its own: coordinator/clock.py reads the step from a file) jumps
    while agents run jobs: leases are on the monotonic clock, so no agent is lost and no job fails."""
    offset = tmp_path / "wall-offset"
    offset.write_text("0")
    cluster.lease_timeout = 10.0  # the agents stop for a few seconds below
    cluster.coordinator_env["DSTACK_TEST_WALL_OFFSET_FILE"] = str(offset)
    cluster.start_coordinator()
    cluster.start_agent("loud", "--max-jobs", "1")
    cluster.start_agent("quiet", "--max-jobs", "1")
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: long
            provider: bash
            commands: ["echo started", "sleep 600"]
        """,
    )
    names = []
    for _ in range(2):
        r = cluster.cli("run", "-d", "long", cwd=project)
        assert r.returncode == 0, r.stderr
        names.append(r.stdout.strip())
    for name in names:

        def started(n: str = name) -> bool:
            return "started" in cluster.cli("logs", n).stdout

        wait_for(started, timeout=60, what="the job to start")
    assert cluster.coordinator is not None
    coordinator = cluster.coordinator
    # The agents are held still around the step (for well under their lease), so the coordinator's lease
    # passes see the stepped clock before any heartbeat does: on the wall clock, that made them lost.
    for agent in cluster.agents:
        agent.popen.send_signal(signal.SIGSTOP)
    try:
        offset.write_text(str(step_s))
        wait_for(lambda: "test clock: the wall clock steps" in coordinator.output(), what="the clock to step")
        stepped = time.monotonic()
        # What is under test is a duration: two lease passes (one a second) after the step.
        wait_for(lambda: time.monotonic() > stepped + 2.5, interval=0.1)
    finally:
        for agent in cluster.agents:
            agent.popen.send_signal(signal.SIGCONT)
    resumed = time.monotonic()
    wait_for(lambda: time.monotonic() > resumed + 2 * cluster.heartbeat + 2, interval=0.2)
    never_lost(cluster)
    assert [cluster.run_info(n)["status"] for n in names] == ["running", "running"]
    for name in names:
        assert cluster.cli("stop", name).returncode == 0
