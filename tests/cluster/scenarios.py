"""The chaos scenarios: a bed (a fresh one, or one `SharedBed` for several in sequence), N one-job runs,
faults while they run, then every invariant checked.

Shared by tests/cluster/test_chaos_fast.py (a few, small) and bench/chaos.py (all, 1,000 jobs each).
A scenario's `inject` runs in a thread once a fifth of the jobs have finished; it records each fault, the
agents it disturbed (and which failure reasons that makes right for jobs there) and when the last fault
was healed; recovery is the time from then until every agent is online and a job has finished since.
"""

from __future__ import annotations

import shutil
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.cluster.bed import BedConfig, ChaosBed
from tests.cluster.invariants import Verdict, check, self_fenced_jobs
from tests.cluster.workload import JobShape, collect, read_evidence, submit, write_project

LOST = {"agent_lost"}
# A job whose agent's disk is full fails on no account: the agent drains (agent/diskspace.py), and an attempt
# the full disk ended (its preparation, or its script's writes) is requeued elsewhere with reason disk_full.
DISK_FULL: set[str] = set()


@dataclass
class Faults:
    """What a scenario's injection did, for the checker and the table."""

    bed: ChaosBed
    outage: float  # seconds a partition, a full disk or an S3 outage lasts
    count: int = 0
    allowed: dict[str, set[str]] = field(default_factory=dict)
    may_fence: set[str] = field(default_factory=set)  # agents cut off from the coordinator: they stop their jobs
    healed_at: float = 0.0  # monotonic
    log: list[str] = field(default_factory=list)
    error: str = ""

    def did(
        self, what: str, agents: list[str] | None = None, reasons: set[str] | None = None, cut_off: bool = False
    ) -> None:
        """`cut_off`: the fault cut `agents` off from the coordinator, so they may stop their jobs (self-fence)."""
        self.count += 1
        self.log.append(f"{time.strftime('%H:%M:%S')} {what}")
        for a in agents or []:
            self.allowed.setdefault(a, set()).update(reasons or set())
            if cut_off:
                self.may_fence.add(a)

    def third(self) -> list[str]:
        names = self.bed.agent_names()
        return names[: max(1, len(names) // 3)]


def _agent_kill(f: Faults) -> None:
    victims = f.third()
    for a in victims:
        f.bed.kill9(a)
        f.did(f"kill -9 {a}", [a], LOST)
    time.sleep(5)
    for a in victims:
        f.bed.restart(a)


def _coordinator_kill(f: Faults) -> None:
    f.bed.kill9("coordinator")
    f.did("kill -9 coordinator")
    time.sleep(3)
    f.bed.restart("coordinator")


# How long the coordinator's port accepts and answers nothing after a restart (coordinator-late-hello): the
# mixed scenario at load 80 saw hellos answered 11 s after the restarted coordinator listened, past the
# agents' 8 s (lease 5 + margin 5 - kill time 2).
LATE_HELLO_S = 12.0


def _coordinator_late_hello(f: Faults) -> None:
    """kill -9 of the coordinator, then its port back but silent for LATE_HELLO_S, then the coordinator: the
    agents were refused while it was down, so none of them may stop a job (HelloAck.reconnect_grace_ms)."""
    f.bed.kill9("coordinator")
    f.did("kill -9 coordinator")
    time.sleep(3)
    silent = f.bed.hold_coordinator_port()
    f.did(f"coordinator's port accepting, nothing answering, for {LATE_HELLO_S:.0f}s")
    time.sleep(LATE_HELLO_S)
    silent.terminate()
    f.bed.restart("coordinator")


def _partition(f: Faults) -> None:
    victims = f.third()
    for a in victims:
        f.bed.cut("coordinator", a)
        f.did(f"partition coordinator | {a} for {f.outage:.0f}s", [a], LOST, cut_off=True)
    time.sleep(f.outage)
    for a in victims:
        f.bed.cut("coordinator", a, cut=False)


def _clock_step(f: Faults) -> None:
    f.bed.step_clock(60)
    f.did("coordinator clock +60s")
    time.sleep(f.outage / 2)
    f.bed.step_clock(-120)
    f.did("coordinator clock -60s (from true time)")
    time.sleep(f.outage / 2)
    f.bed.step_clock(60)


def _agent_disk(f: Faults) -> None:
    a = f.bed.agent_names()[0]
    written = f.bed.fill_disk(a)
    f.did(f"{a}'s work folder full ({written >> 20} MiB filler) for {f.outage:.0f}s", [a], DISK_FULL)
    time.sleep(f.outage)
    f.bed.free_disk(a)


def _coordinator_disk(f: Faults) -> None:
    written = f.bed.fill_disk("coordinator")
    f.did(f"coordinator's state folder full ({written >> 20} MiB filler) for {f.outage:.0f}s")
    time.sleep(f.outage)
    f.bed.free_disk("coordinator")


def _s3_outage(f: Faults) -> None:
    f.bed.isolate("s3")
    f.did(f"S3 host unreachable for {f.outage:.0f}s")
    time.sleep(f.outage)
    f.bed.isolate("s3", down=False)


def _mixed(f: Faults) -> None:
    names = f.bed.agent_names()
    cut = f.third()
    killed = [a for a in names if a not in cut][:1]
    for a in cut:
        f.bed.cut("coordinator", a)
        f.did(f"partition coordinator | {a} for {f.outage:.0f}s", [a], LOST, cut_off=True)
    for a in killed:
        f.bed.kill9(a)
        f.did(f"kill -9 {a}", [a], LOST)
    f.bed.kill9("coordinator")
    f.did("kill -9 coordinator")
    time.sleep(3)
    f.bed.restart("coordinator")
    time.sleep(2)
    for a in killed:
        f.bed.restart(a)
    time.sleep(max(0.0, f.outage - 5))
    for a in cut:
        f.bed.cut("coordinator", a, cut=False)


SCENARIOS: dict[str, Callable[[Faults], None]] = {
    "agent-kill": _agent_kill,
    "coordinator-kill": _coordinator_kill,
    "coordinator-late-hello": _coordinator_late_hello,
    "partition": _partition,
    "clock-step": _clock_step,
    "agent-disk-full": _agent_disk,
    "coordinator-disk-full": _coordinator_disk,
    "s3-outage": _s3_outage,
    "mixed": _mixed,
}


@dataclass
class Result:
    scenario: str
    jobs: int
    faults: int
    verdict: Verdict
    recover_s: float
    wall_s: float
    fault_log: list[str]
    error: str = ""
    load: tuple[float, float] = (float("nan"), float("nan"))  # the machine's 1-minute load average, min and max


class LoadSampler:
    """The machine's 1-minute load average every few seconds while a scenario runs (the bed shares the
    machine: its figures mean little without the load they were taken under)."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)

    def _run(self) -> None:
        while True:
            try:
                self.samples.append(float(Path("/proc/loadavg").read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                pass
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def span(self) -> tuple[float, float]:
        return (min(self.samples), max(self.samples)) if self.samples else (float("nan"), float("nan"))


def fenced_by_agent(bed: ChaosBed, since: dict[str, int] | None = None) -> dict[str, int]:
    """Jobs each agent stopped by self-fencing, from its log (from the byte offsets in `since`, when a bed
    that earlier scenarios used is read: their fences are theirs)."""
    out = {}
    for name in bed.agent_names():
        try:
            with (bed.root / "logs" / f"{name}.log").open("rb") as f:
                f.seek((since or {}).get(name, 0))
                out[name] = self_fenced_jobs(f.read().decode(errors="replace"))
        except OSError:
            out[name] = 0
    return out


def run_scenario(
    name: str,
    root: Path,
    jobs: int,
    config: BedConfig,
    shape: JobShape,
    outage: float,
    finish_timeout: float,
    keep: bool = False,
    bed: ChaosBed | None = None,
    earlier_evidence: Sequence[Path] = (),
) -> Result:
    """One scenario end to end under `root` (removed after, unless it failed or `keep`): on a fresh bed of
    `config`, or on `bed`, started and healthy (a `SharedBed`'s), which it leaves healed, with every agent
    online, for the next scenario. Only this scenario's runs, evidence and agent-log lines are checked, and
    for GPUs held twice also the evidence of the scenarios run on that bed before (`earlier_evidence`)."""
    inject = SCENARIOS[name]
    t0 = time.monotonic()
    own_bed = bed is None
    bed = bed or ChaosBed(root / "bed", config)
    evidence = root / "evidence"
    project = write_project(root / "project", evidence, shape)
    faults = Faults(bed, outage)
    error = ""
    with LoadSampler() as load:
        try:
            if own_bed:
                bed.start()
            log_from = bed.log_sizes()
            with bed.client(timeout=60) as client:
                names = submit(client, project, jobs, shape)

            def finished() -> int:
                return sum(1 for p in evidence.iterdir() if p.suffix == ".manifest")

            def injector() -> None:
                try:
                    deadline = time.monotonic() + finish_timeout
                    while finished() < max(1, jobs // 5) and time.monotonic() < deadline:
                        time.sleep(0.2)
                    inject(faults)
                except Exception:
                    faults.error = traceback.format_exc()
                finally:
                    faults.healed_at = time.monotonic()

            thread = threading.Thread(target=injector, name=f"chaos-{name}", daemon=True)
            thread.start()
            thread.join(finish_timeout)
            # Whatever the injection left undone (an error in it) is undone now: the checks need a healed pool.
            bed.heal_all()
            recover_s = _recover(bed, evidence, faults.healed_at or time.monotonic(), finish_timeout)
            with bed.client(timeout=60) as client:
                _wait_finished(client, names, finish_timeout)
                reports, listed = collect(client, names, root / "downloads")
            host_of_netns = {h.netns: h.name for h in bed.hosts.values()}
            verdict = check(
                names,
                listed,
                reports,
                read_evidence(evidence),
                shape,
                host_of_netns,
                faults.allowed,
                fenced=fenced_by_agent(bed, since=log_from),
                may_fence=faults.may_fence,
                earlier=[e for d in earlier_evidence for e in read_evidence(d)],
            )
            error = faults.error
        except Exception:
            error = traceback.format_exc()
            verdict = Verdict(jobs=jobs)
            recover_s = float("nan")
        finally:
            if own_bed:
                bed.close()
            else:
                # The next scenario needs the bed as it found it: every fault healed (a killed coordinator or
                # agent restarted), every agent online. A bed that cannot be restored fails this scenario.
                try:
                    bed.heal_all()
                    bed.wait_agents_online(timeout=finish_timeout)
                except Exception:
                    error += f"\nthe bed could not be restored after the scenario:\n{traceback.format_exc()}"
    result = Result(name, jobs, faults.count, verdict, recover_s, time.monotonic() - t0, faults.log, error, load.span())
    if not keep and not error and not verdict.violations():
        shutil.rmtree(root, ignore_errors=True)
    return result


class SharedBed:
    """One bed for scenarios run in sequence (the CI subset: a bed costs a coordinator, weed and the agents
    started and stopped, and namespaces made and removed). Each scenario gets it healthy: `get` heals what an
    earlier one left and waits for every agent; a bed that does not come back is replaced by a fresh one, so
    one scenario's breakage fails that scenario, not the next. The scenarios' evidence stays until `close`: a
    job of an earlier one still running (or writing) on a GPU a later one took is a conflict the later one
    counts. Folders are kept for what failed: a scenario's, and the bed's (the processes' logs)."""

    def __init__(self, root: Path, config: BedConfig) -> None:
        self.root = root
        self.config = config
        self.bed: ChaosBed | None = None
        self.beds = 0
        self.failed = False
        self.passed: list[Path] = []  # roots of the scenarios that passed, removed at `close`
        self.evidence: list[Path] = []

    def get(self) -> ChaosBed:
        if self.bed is not None:
            try:
                self.bed.heal_all()
                self.bed.wait_agents_online(timeout=120)
                return self.bed
            except Exception:
                self.failed = True
                self.bed.close()
                self.bed = None
                self.evidence.clear()  # its jobs died with it; a new bed's hosts are others
        self.beds += 1
        self.bed = ChaosBed(self.root / f"bed-{self.beds}", self.config).start()
        return self.bed

    def run(
        self,
        name: str,
        root: Path,
        jobs: int,
        shape: JobShape,
        outage: float,
        finish_timeout: float,
        keep: bool = False,
    ) -> Result:
        """`run_scenario` on this bed."""
        try:
            bed = self.get()
        except Exception:
            self.failed = True
            return Result(name, jobs, 0, Verdict(jobs=jobs), float("nan"), 0.0, [], traceback.format_exc())
        # Kept (keep=True) until `close`: the later scenarios read its evidence.
        result = run_scenario(
            name,
            root,
            jobs,
            self.config,
            shape,
            outage,
            finish_timeout,
            keep=True,
            bed=bed,
            earlier_evidence=self.evidence,
        )
        self.evidence.append(root / "evidence")
        if result.error or result.verdict.violations():
            self.failed = True
        elif not keep:
            self.passed.append(root)
        return result

    def close(self, keep: bool = False) -> None:
        if self.bed is not None:
            self.bed.close()
            self.bed = None
        for root in [] if keep else self.passed:
            shutil.rmtree(root, ignore_errors=True)
        if not keep and not self.failed:
            shutil.rmtree(self.root, ignore_errors=True)


def _recover(bed: ChaosBed, evidence: Path, healed_at: float, timeout: float) -> float:
    """Seconds from the last heal until every agent is online and some job finished after it."""
    wall_healed = time.time() - (time.monotonic() - healed_at)
    deadline = time.monotonic() + timeout
    bed.wait_agents_online(timeout=timeout)
    while time.monotonic() < deadline:
        if any(p.suffix == ".manifest" and p.stat().st_mtime > wall_healed for p in evidence.iterdir()):
            break
        time.sleep(0.2)
    return time.monotonic() - healed_at


def _wait_finished(client: object, names: list[str], timeout: float) -> None:
    from dstack.api import Client, WaitTimeout

    assert isinstance(client, Client)
    runs = [client.runs.get(n) for n in names]
    try:
        client.runs.wait(runs, timeout=timeout)
    except WaitTimeout:
        pass  # the checker counts what did not finish


COLUMNS = (
    "scenario",
    "jobs",
    "faults",
    "requeued",
    "interrupted",
    "done",
    "failed (allowed)",
    "lost",
    "not terminal",
    "wrong reason",
    "false agent-lost",
    "ran twice at once",
    "GPU held twice",
    "lines lost",
    "lines duplicated",
    "stale attempts' lines not shown",
    "artifact mismatches",
    "healthy jobs self-fenced",
    "recover (s)",
    "wall (s)",
    "load avg (1 min)",
)


def table(results: list[Result]) -> str:
    """A markdown table: one row per scenario (the invariants' counts; requeued and interrupted show the faults hit)."""
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in results:
        v = r.verdict
        cells = [
            r.scenario + (" (error)" if r.error else ""),
            *map(
                str,
                (
                    r.jobs,
                    r.faults,
                    v.requeued,
                    v.interrupted,
                    v.done,
                    v.failed_allowed,
                    v.lost,
                    v.not_terminal,
                    v.wrong_reason,
                    v.false_agent_lost,
                    v.duplicated,
                    v.gpu_conflicts,
                    v.lines_lost,
                    v.lines_duplicated,
                    v.stale_lines_dropped,
                    v.artifact_mismatches,
                    v.healthy_fenced,
                ),
            ),
            f"{r.recover_s:.1f}",
            f"{r.wall_s:.0f}",
            f"{r.load[0]:.0f}-{r.load[1]:.0f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
