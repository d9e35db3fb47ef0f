"""The chaos checker itself (tests/cluster/invariants.py): each violation it exists for is caught, from made-up
evidence and reports (no processes: a checker that never fails would let every scenario pass)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from tests.cluster import scenarios
from tests.cluster.bed import BedConfig, BedError, ChaosBed, publish
from tests.cluster.invariants import Verdict, check, self_fenced_jobs
from tests.cluster.scenarios import fenced_by_agent
from tests.cluster.workload import Execution, JobShape, Reported

SHAPE = JobShape(lines=3)
HOSTS = {"ns-a": "agent-a", "ns-b": "agent-b"}
DATA = b"payload"


def execution(run: str, attempt: int, host: str, start: float, last: float, gpu: str = "0") -> Execution:
    exe = f"{run}-job.{attempt}.{int(start)}"
    return Execution(
        exe=exe,
        attempt=attempt,
        run=run,
        host=host,
        gpus=[gpu],
        start=start,
        last=last,
        ticks=SHAPE.lines,
        ended=True,
        manifest={"data.bin": hashlib.sha256(DATA).hexdigest(), "who.txt": hashlib.sha256(exe.encode()).hexdigest()},
    )


def report(
    e: Execution, lines: list[int] | None = None, attempts: list[tuple[int, str, str]] | None = None
) -> Reported:
    numbers = list(range(1, SHAPE.lines + 1)) if lines is None else lines
    who = e.exe.encode()
    return Reported(
        run=e.run,
        status="done",
        reason="done",
        attempt=e.attempt,
        agent=HOSTS[e.host],
        attempts=attempts or [],
        lines=[f"chaos {e.exe} {i}" for i in numbers],
        artifacts={"out/data.bin": e.manifest["data.bin"], "out/who.txt": e.manifest["who.txt"]},
        downloaded={"out/data.bin": DATA, "out/who.txt": who},
    )


def verdict(
    executions: list[Execution], reports: list[Reported], allowed: dict[str, set[str]] | None = None
) -> Verdict:
    names = [r.run for r in reports]
    return check(names, set(names), reports, executions, SHAPE, HOSTS, allowed or {})


def test_a_clean_scenario_has_no_violation() -> None:
    a, b = execution("r1", 1, "ns-a", 0, 1), execution("r2", 1, "ns-a", 1, 2)
    v = verdict([a, b], [report(a), report(b)])
    assert v.violations() == 0 and v.done == 2, v.details


def test_an_attempt_running_while_the_next_runs_elsewhere_is_caught() -> None:
    stale, new = execution("r1", 1, "ns-a", 0, 10), execution("r1", 2, "ns-b", 5, 7)
    stale.ended = False
    v = verdict([stale, new], [report(new, attempts=[(1, "agent-a", "agent_lost")])], {"agent-a": {"agent_lost"}})
    assert v.duplicated == 1 and v.false_agent_lost == 0, v.details


def test_one_gpu_held_by_two_jobs_at_once_is_caught_and_another_gpu_is_not() -> None:
    a, b = execution("r1", 1, "ns-a", 0, 5, gpu="0"), execution("r2", 1, "ns-a", 4, 6, gpu="0")
    c = execution("r3", 1, "ns-a", 4, 6, gpu="1")
    v = verdict([a, b, c], [report(a), report(b), report(c)])
    assert v.gpu_conflicts == 1, v.details


def test_on_a_shared_bed_an_earlier_scenarios_job_still_on_a_gpu_is_the_later_ones_conflict() -> None:
    """A job of an earlier scenario on the same bed that still held GPU 0 when this scenario's job took it
    is caught; earlier jobs' own overlaps, and earlier jobs on other GPUs or hosts, are not this one's."""
    leftover = execution("old1", 1, "ns-a", 0, 12, gpu="0")  # the earlier scenario's, still ticking
    old_pair = [execution("old2", 1, "ns-b", 0, 5, gpu="1"), execution("old3", 1, "ns-b", 4, 6, gpu="1")]
    elsewhere = execution("old4", 1, "ns-b", 0, 12, gpu="0")
    mine = execution("r1", 1, "ns-a", 10, 14, gpu="0")
    v = check(["r1"], {"r1"}, [report(mine)], [mine], SHAPE, HOSTS, {}, earlier=[leftover, *old_pair, elsewhere])
    assert v.gpu_conflicts == 1 and "old1" in v.details[0], v.details
    assert check(["r1"], {"r1"}, [report(mine)], [mine], SHAPE, HOSTS, {}).gpu_conflicts == 0


def test_lost_and_doubled_log_lines_are_counted() -> None:
    a, b = execution("r1", 1, "ns-a", 0, 1), execution("r2", 1, "ns-b", 0, 1)
    v = verdict([a, b], [report(a, lines=[1, 3]), report(b, lines=[1, 2, 2, 3])])
    assert (v.lines_lost, v.lines_duplicated) == (1, 1), v.details


def test_an_interrupted_attempt_may_lose_its_tail_but_not_a_middle_line() -> None:
    first, second = execution("r1", 1, "ns-a", 0, 1), execution("r1", 2, "ns-b", 2, 3)
    first.ended = False
    r = report(second, attempts=[(1, "agent-a", "agent_lost")])
    r.lines = [f"chaos {first.exe} 1", *r.lines]  # the first attempt's line 1 arrived, 2 and 3 died with it
    v = verdict([first, second], [r], {"agent-a": {"agent_lost"}})
    assert v.violations() == 0 and v.tail_undelivered == 2, v.details
    r.lines = [f"chaos {first.exe} 1", f"chaos {first.exe} 3", *r.lines[1:]]
    assert verdict([first, second], [r], {"agent-a": {"agent_lost"}}).lines_lost == 1


def test_artifacts_of_an_earlier_attempt_or_unlike_their_manifest_are_mismatches() -> None:
    first, second = execution("r1", 1, "ns-a", 0, 1), execution("r1", 2, "ns-b", 2, 3)
    r = report(second, attempts=[(1, "agent-a", "agent_lost")])
    r.downloaded["out/who.txt"] = first.exe.encode()  # the stale attempt's upload won
    assert verdict([first, second], [r], {"agent-a": {"agent_lost"}}).artifact_mismatches >= 1
    r = report(second)
    r.downloaded["out/data.bin"] = b"corrupt"
    assert verdict([first, second], [r]).artifact_mismatches == 1


def test_a_missing_run_a_false_loss_and_a_wrong_reason_are_caught() -> None:
    a = execution("r1", 1, "ns-a", 0, 1)
    r = report(a, attempts=[(1, "agent-b", "agent_lost")])  # agent-b was never disturbed
    failed = report(execution("r2", 1, "ns-b", 0, 1))
    failed.status, failed.reason = "failed", "agent_lost"
    v = check(["r1", "r2", "r3"], {"r1", "r2"}, [r, failed], [a], SHAPE, HOSTS, {})
    assert (v.lost, v.false_agent_lost, v.wrong_reason) == (1, 1, 1), v.details
    allowed = check(["r2"], {"r2"}, [failed], [], SHAPE, HOSTS, {"agent-b": {"agent_lost"}})
    assert allowed.failed_allowed == 1 and allowed.wrong_reason == 0


def test_jobs_stopped_by_self_fencing_count_only_on_agents_no_fault_cut_off() -> None:
    """An agent's log says how many jobs it fenced; on an agent that was cut off that is the design, on any
    other (its acks late behind a busy coordinator, a coordinator restart) a healthy job was stopped."""
    log = (
        "12:00:01 WARNING dstack.agent: no lease renewal acknowledged by the coordinator for 8.0s: stopping 3 job(s)"
        " (self-fence)\n12:00:02 INFO dstack.agent: job x ended\n"
        "12:01:00 WARNING dstack.agent: no lease renewal acknowledged by the coordinator for 8.0s: stopping 1 job(s)"
        " (self-fence)\n"
    )
    assert self_fenced_jobs(log) == 4 and self_fenced_jobs("stopping jobs") == 0
    a = execution("r1", 1, "ns-a", 0, 1)
    fenced = {"agent-a": 2, "agent-b": 4}
    v = check(["r1"], {"r1"}, [report(a)], [a], SHAPE, HOSTS, {}, fenced=fenced, may_fence={"agent-b"})
    assert v.healthy_fenced == 2 and v.violations() == 2, v.details
    assert (
        check(["r1"], {"r1"}, [report(a)], [a], SHAPE, HOSTS, {}, fenced=fenced, may_fence=set(fenced)).violations()
        == 0
    )


def test_the_beds_ca_copy_is_never_seen_empty_while_it_is_published_again(tmp_path: Path) -> None:
    """Agents read the bed's CA copy as they start while the bed starts the next agent and makes clients,
    each of which published it again: written in place, a reader could find it empty (an agent exited,
    "no PEM certificate", and a 1,000-job scenario failed waiting for it). Published atomically, and not
    rewritten when unchanged, a reader always sees the whole certificate."""
    source, target = tmp_path / "src.pem", tmp_path / "ca.pem"
    pem = b"-----BEGIN CERTIFICATE-----\n" + b"A" * 2000 + b"\n-----END CERTIFICATE-----\n"
    source.write_bytes(pem)
    publish(source, target)
    inode = target.stat().st_ino
    publish(source, target)
    assert target.stat().st_ino == inode  # unchanged: left alone
    seen: set[bytes] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.add(target.read_bytes())

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for i in range(300):  # a new CA each time (a changed one is published too), as fast as it goes
            source.write_bytes(pem.replace(b"A", b"ABCD"[i % 4 : i % 4 + 1]))
            publish(source, target)
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert all(s.startswith(b"-----BEGIN") and s.endswith(b"-----\n") for s in seen), sorted(map(len, seen))


def test_a_scenario_on_a_shared_bed_counts_only_the_fences_logged_after_it_began(tmp_path: Path) -> None:
    """Scenarios in sequence on one bed read the agents' logs from where each began: a fence an earlier
    scenario's cut-off agent logged is not charged to the next, and one logged since is (not hidden)."""
    bed = ChaosBed(tmp_path, BedConfig(agents=2))
    logs = tmp_path / "logs"
    logs.mkdir()
    earlier = "WARNING no lease renewal acknowledged by the coordinator for 8.0s: stopping 3 job(s) (self-fence)\n"
    (logs / "agent-0.log").write_text(earlier)
    (logs / "agent-1.log").write_text("INFO connected\n")
    since = bed.log_sizes()
    assert fenced_by_agent(bed, since) == {"agent-0": 0, "agent-1": 0}
    with (logs / "agent-1.log").open("a") as f:
        f.write("WARNING no lease renewal acknowledged by the coordinator for 8.0s: stopping 2 job(s) (self-fence)\n")
    assert fenced_by_agent(bed, since) == {"agent-0": 0, "agent-1": 2}
    assert fenced_by_agent(bed) == {"agent-0": 3, "agent-1": 2}  # a fresh bed's reading: every line


def test_a_shared_bed_a_scenario_broke_beyond_healing_is_replaced_before_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One scenario's breakage fails that scenario, not the next: a bed whose heal or agents do not come
    back is closed and a fresh one started (its folder kept: a scenario failed on it)."""
    started: list[Path] = []
    closed: list[Path] = []

    class FreshBed:
        def __init__(self, root: Path, config: BedConfig) -> None:
            self.root = root

        def start(self) -> FreshBed:
            started.append(self.root)
            return self

        def heal_all(self) -> None:
            pass

        def wait_agents_online(self, timeout: float) -> float:
            return 0.0

        def close(self) -> None:
            closed.append(self.root)

    monkeypatch.setattr(scenarios, "ChaosBed", FreshBed)
    shared = scenarios.SharedBed(tmp_path, BedConfig(agents=1))
    first = shared.get()
    assert shared.get() is first and len(started) == 1  # healthy: kept

    def agents_never_back(timeout: float) -> float:
        raise BedError("timed out waiting for agents ['agent-0'] online")

    monkeypatch.setattr(first, "wait_agents_online", agents_never_back)
    second = shared.get()
    assert second is not first and started == [tmp_path / "bed-1", tmp_path / "bed-2"]
    assert closed == [tmp_path / "bed-1"]
    shared.close()
    assert closed == [tmp_path / "bed-1", tmp_path / "bed-2"] and tmp_path.exists()  # kept for its logs
