"""The invariants every scenario must keep, checked from the jobs' own evidence against dstack's reports.

- no job lost: every submitted run is listed (`dstack ps -a`'s listing, every page);
- every job terminal with the right reason: `done`, or a failure whose reason the scenario allows on an
  agent it disturbed (e.g. `agent_lost` only on an agent that was killed or cut off); an earlier attempt
  that ended `agent_lost` on an agent nobody disturbed is a false loss;
- no job ran twice at once: two executions of one job (same attempt or not) whose evidence intervals
  overlap in time;
- no GPU held by two jobs at once: executions of different jobs on one host with one GPU index in common
  whose intervals overlap;
- no log line lost or shown twice: per execution, each `chaos EXE I` at most once; the final attempt's
  execution shows 1..LINES exactly; an earlier one shows no gap below its last line shown (its tail may
  be lost with a killed agent: counted apart, not a violation);
- every artifact matches its manifest: downloaded (the client checks the sha256 it was given), written
  by the final attempt's execution, and equal to the manifest that execution wrote beside its evidence;
- no healthy job stopped by self-fencing (agent/lease.py): an agent stops its jobs itself only when it was
  cut off from the coordinator; jobs it stopped on any other account (acks late behind a busy coordinator,
  a coordinator restart) are counted from the agents' own logs (`fenced`).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from tests.cluster.workload import Execution, JobShape, Reported, chaos_lines

TERMINAL = {"done", "failed", "stopped"}


@dataclass
class Verdict:
    jobs: int = 0
    done: int = 0
    failed_allowed: int = 0  # failed with a reason the scenario allows (e.g. agent_lost on a killed agent)
    lost: int = 0  # submitted, not listed
    not_terminal: int = 0
    wrong_reason: int = 0
    false_agent_lost: int = 0  # attempts lost on an agent no fault touched
    duplicated: int = 0  # jobs with two executions at once
    gpu_conflicts: int = 0  # pairs of jobs on one GPU at once
    lines_lost: int = 0
    lines_duplicated: int = 0
    requeued: int = 0  # jobs that needed more than one attempt (not a violation: evidence the faults hit)
    interrupted: int = 0  # executions that never finished (killed with their agent, or stopped as stale)
    tail_undelivered: int = 0  # lines an interrupted execution printed that never arrived (not a violation)
    stale_lines_dropped: int = 0  # lines of an earlier attempt that ran to its end (cut off) never shown
    artifact_mismatches: int = 0
    healthy_fenced: int = 0  # jobs an agent no fault cut off stopped itself for want of an acknowledged renewal
    failures: Counter[str] = field(default_factory=Counter)  # "REASON on AGENT" -> jobs that ended so
    details: list[str] = field(default_factory=list)

    def violations(self) -> int:
        return (
            self.lost
            + self.not_terminal
            + self.wrong_reason
            + self.false_agent_lost
            + self.duplicated
            + self.gpu_conflicts
            + self.lines_lost
            + self.lines_duplicated
            + self.artifact_mismatches
            + self.healthy_fenced
        )

    def note(self, text: str) -> None:
        if len(self.details) < 200:
            self.details.append(text)


# agent/connection.py's warning when it fences: "... stopping N job(s) (self-fence)".
_FENCE_LINE = re.compile(r"stopping (\d+) job\(s\) \(self-fence\)")


def self_fenced_jobs(agent_log: str) -> int:
    """How many jobs an agent stopped by self-fencing, from its log (all its lives: the bed appends)."""
    return sum(int(m.group(1)) for m in _FENCE_LINE.finditer(agent_log))


def _overlap(a: Execution, b: Execution) -> float:
    """Seconds two executions ran at the same time (their evidence intervals' intersection)."""
    return min(a.last, b.last) - max(a.start, b.start)


def check(
    submitted: list[str],
    listed: set[str],
    reports: list[Reported],
    executions: list[Execution],
    shape: JobShape,
    host_of_netns: dict[str, str],
    allowed_failures: dict[str, set[str]],
    fenced: dict[str, int] | None = None,
    may_fence: frozenset[str] | set[str] = frozenset(),
    earlier: Sequence[Execution] = (),
) -> Verdict:
    """`host_of_netns`: network namespace -> agent name. `allowed_failures`: agent -> the termination reasons
    the scenario's faults on it make right (agents not named: none). `fenced`: agent -> jobs it stopped by
    self-fencing (its log, `self_fenced_jobs`); `may_fence`: the agents a fault cut off from the coordinator,
    the only ones that may. `earlier`: executions of scenarios run before on the same bed, read again now:
    one of theirs still holding a GPU when one of these took it is this scenario's GPU conflict."""
    v = Verdict(jobs=len(submitted))
    for agent, n in sorted((fenced or {}).items()):
        if n and agent not in may_fence:
            v.healthy_fenced += n
            v.note(f"{agent}, which no fault cut off, stopped {n} job(s) itself (self-fence)")
    by_run: dict[str, list[Execution]] = defaultdict(list)
    for e in executions:
        by_run[e.run].append(e)

    for name in submitted:
        if name not in listed:
            v.lost += 1
            v.note(f"{name}: submitted, not listed")

    for r in reports:
        execs = sorted(by_run.get(r.run, []), key=lambda e: e.start)
        v.requeued += r.attempt > 1
        v.interrupted += sum(not e.ended for e in execs)
        if r.status not in TERMINAL:
            v.not_terminal += 1
            v.note(f"{r.run}: still {r.status}")
        elif r.status == "done":
            v.done += 1
        elif r.reason in allowed_failures.get(r.agent, set()):
            v.failed_allowed += 1
            v.failures[f"{r.reason} on {r.agent}"] += 1
        else:
            v.wrong_reason += 1
            v.failures[f"{r.reason} on {r.agent or 'no agent'}"] += 1
            v.note(f"{r.run}: {r.status} ({r.reason}) on {r.agent or 'no agent'}, attempt {r.attempt}")
        for attempt, agent, reason in r.attempts:
            if reason == "agent_lost" and "agent_lost" not in allowed_failures.get(agent, set()):
                v.false_agent_lost += 1
                v.note(f"{r.run}: attempt {attempt} ended agent_lost on {agent}, which no fault touched")

        # Two executions of one job at once.
        for i, a in enumerate(execs):
            for b in execs[i + 1 :]:
                if _overlap(a, b) > 0:
                    v.duplicated += 1
                    v.note(
                        f"{r.run}: attempt {a.attempt} on {host_of_netns.get(a.host, a.host)} and attempt "
                        f"{b.attempt} on {host_of_netns.get(b.host, b.host)} ran at once for {_overlap(a, b):.2f}s"
                    )

        _check_lines(v, r, execs, shape)
        if r.status == "done":
            _check_artifacts(v, r, execs)

    # One GPU, two jobs at once.
    by_gpu: dict[tuple[str, str], list[Execution]] = defaultdict(list)
    mine = {id(e) for e in executions}
    for e in [*executions, *earlier]:
        for g in e.gpus:
            by_gpu[(e.host, g)].append(e)
    for (host, gpu), execs in by_gpu.items():
        execs.sort(key=lambda e: e.start)
        for i, a in enumerate(execs):
            for b in execs[i + 1 :]:
                if b.start >= a.last:
                    break
                if a.run != b.run and (id(a) in mine or id(b) in mine) and _overlap(a, b) > 0:
                    v.gpu_conflicts += 1
                    v.note(
                        f"GPU {gpu} of {host_of_netns.get(host, host)}: {a.run} (attempt {a.attempt}) and "
                        f"{b.run} (attempt {b.attempt}) held it at once for {_overlap(a, b):.2f}s"
                    )
    return v


def _check_lines(v: Verdict, r: Reported, execs: list[Execution], shape: JobShape) -> None:
    seen: dict[str, Counter[int]] = defaultdict(Counter)
    for exe, i in chaos_lines(r.lines):
        seen[exe][i] += 1
    known = {e.exe: e for e in execs}
    for exe, counts in seen.items():
        extra = sum(n - 1 for n in counts.values() if n > 1)
        if extra:
            v.lines_duplicated += extra
            v.note(f"{r.run}: {extra} line(s) of {exe} shown twice")
        if exe not in known:
            v.note(f"{r.run}: lines of {exe}, an execution with no evidence")
    final = _final_execution(r, execs)
    for e in execs:
        counts = seen.get(e.exe, Counter())
        top = max(counts, default=0)
        if e is final:
            missing = [i for i in range(1, shape.lines + 1) if i not in counts]
        else:
            missing = [i for i in range(1, top) if i not in counts]
            undelivered = max(0, e.ticks - top)
            if e.ended:  # it ran to its end, cut off from the coordinator: its lines were sent late
                v.stale_lines_dropped += undelivered
                if undelivered:
                    v.note(
                        f"{r.run}: {undelivered} line(s) of {e.exe}, an earlier attempt that ran to its end, not shown"
                    )
            else:
                v.tail_undelivered += undelivered
        if missing:
            v.lines_lost += len(missing)
            v.note(f"{r.run}: {len(missing)} line(s) of {e.exe} lost (first {missing[:5]})")


def _final_execution(r: Reported, execs: list[Execution]) -> Execution | None:
    """The execution whose result the run reports: its last attempt's, the one that finished."""
    if r.status != "done":
        return None
    mine = [e for e in execs if e.attempt == r.attempt and e.ended]
    who = r.downloaded.get("out/who.txt", b"").decode(errors="replace").strip()
    return next((e for e in mine if e.exe == who), mine[0] if mine else None)


def _check_artifacts(v: Verdict, r: Reported, execs: list[Execution]) -> None:
    if r.download_error:
        v.artifact_mismatches += 1
        v.note(f"{r.run}: artifacts did not download: {r.download_error}")
        return
    who = r.downloaded.get("out/who.txt", b"").decode(errors="replace").strip()
    writer = next((e for e in execs if e.exe == who), None)
    if writer is None:
        v.artifact_mismatches += 1
        v.note(f"{r.run}: artifacts of an unknown execution ({who!r})")
        return
    if writer.attempt != r.attempt:
        v.artifact_mismatches += 1
        v.note(f"{r.run}: artifacts of attempt {writer.attempt}, the run's last is {r.attempt}")
    for name in ("data.bin", "who.txt"):
        got = r.downloaded.get(f"out/{name}")
        want = writer.manifest.get(name)
        listed = r.artifacts.get(f"out/{name}")
        if got is None or want is None or hashlib.sha256(got).hexdigest() != want or listed != want:
            v.artifact_mismatches += 1
            v.note(f"{r.run}: out/{name} does not match its manifest (listed {listed}, manifest {want})")
