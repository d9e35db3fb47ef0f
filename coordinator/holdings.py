"""What running jobs hold, kept between scheduling passes: per agent (CPU, memory, GPUs, job slots)
and per user (GPUs and jobs, for quotas), with each job's start and duration key (fair share's
running usage, expected ends).

A pass used to read every running job from the database (a join over thousands of rows at 5,000
agents) and sum them up again. Now the engine reads them all only on a full pass (and after a failed
one); between, it adds its own placements here and rereads only the jobs the writer's journal says
changed (coordinator/store/journal.py: ended, started, requeued), so what is kept is what a read would
give (tests/unit/test_incremental_state.py checks it against a rebuild, tests/inproc/test_job_journal.py
against the database). The reread every REREAD_S applies what it reads as a difference (`sync`), so
one that finds what is kept costs comparisons, not a rebuild (tests/unit/test_reread.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Held:
    job_id: str
    agent_id: str
    owner: str
    cpu: float
    memory: int
    gpu_indices: tuple[int, ...]
    started_at: int | None  # wall ns, None until the agent reports it started
    duration_key: str  # what its recent durations are filed under (coordinator/durations.py)


@dataclass
class AgentHeld:
    cpu: float = 0.0
    memory: int = 0
    gpus: set[int] = field(default_factory=set)
    jobs: int = 0


class Holdings:
    def __init__(self) -> None:
        self.jobs: dict[str, Held] = {}
        self.agents: dict[str, AgentHeld] = {}
        self.user_gpus: dict[str, int] = {}
        self.user_jobs: dict[str, int] = {}
        # The agents whose holdings changed since the engine last took them (`take_touched`): a heads-only
        # pass refreshes only those agents' states.
        self.touched: set[str] = set()

    def take_touched(self) -> set[str]:
        touched, self.touched = self.touched, set()
        return touched

    def reset(self, held: Iterable[Held]) -> None:
        """What the database says runs now (replaces everything kept)."""
        self.jobs = {}
        self.agents = {}
        self.user_gpus = {}
        self.user_jobs = {}
        for h in held:
            self.add(h)

    def sync(self, held: Iterable[Held]) -> int:
        """What the database says runs now, as `reset` would leave it, applied as a difference: the jobs it
        no longer lists leave, the ones it lists differently or newly are added again, the rest stays, and
        only the agents of what differed are touched (a heads-only pass builds only their states again).
        A reset rebuilt every record, sum and set (50 ms at 5,000 agents, every REREAD_S) even when the
        reread found what was kept. Returns how many jobs differed."""
        read = {h.job_id: h for h in held}
        gone = [job_id for job_id in self.jobs if job_id not in read]
        for job_id in gone:
            self.remove(job_id)
        differed = len(gone)
        jobs = self.jobs
        for job_id, h in read.items():
            kept = jobs.get(job_id)
            if kept is h:
                continue
            if kept == h:
                jobs[job_id] = h  # the read's own record: the next reread finds it the same object
                continue
            self.add(h)
            differed += 1
        # Each agent's CPU and GPUs made again from the read, as `reset` makes them: adding and taking away
        # floats between rereads can leave a residue (0.1 + 0.2 - 0.2) that would decide an exact fit, and
        # taking away a job frees its GPUs even where a write we did not see gave one to two jobs.
        cpu: dict[str, float] = {}
        gpus: dict[str, set[int]] = {}
        for h in read.values():
            cpu[h.agent_id] = cpu.get(h.agent_id, 0.0) + h.cpu
            if h.gpu_indices:
                gpus.setdefault(h.agent_id, set()).update(h.gpu_indices)
        for agent_id, a in self.agents.items():
            fresh_gpus = gpus.get(agent_id, set())
            if a.cpu != cpu[agent_id] or a.gpus != fresh_gpus:
                a.cpu, a.gpus = cpu[agent_id], fresh_gpus
                self.touched.add(agent_id)
        return differed

    def add(self, h: Held) -> None:
        """A job the engine just placed (or one read from the database)."""
        old = self.jobs.get(h.job_id)
        if old is not None:
            self.remove(old.job_id)
        self.jobs[h.job_id] = h
        self.touched.add(h.agent_id)
        a = self.agents.get(h.agent_id)
        if a is None:
            a = self.agents[h.agent_id] = AgentHeld()
        a.cpu += h.cpu
        a.memory += h.memory
        a.gpus.update(h.gpu_indices)
        a.jobs += 1
        self.user_gpus[h.owner] = self.user_gpus.get(h.owner, 0) + len(h.gpu_indices)
        self.user_jobs[h.owner] = self.user_jobs.get(h.owner, 0) + 1

    def remove(self, job_id: str) -> None:
        h = self.jobs.pop(job_id, None)
        if h is None:
            return
        self.touched.add(h.agent_id)
        a = self.agents[h.agent_id]
        a.jobs -= 1
        if not a.jobs:
            del self.agents[h.agent_id]  # nothing left: no float residue of CPU sums
        else:
            a.cpu -= h.cpu
            a.memory -= h.memory
            a.gpus.difference_update(h.gpu_indices)
        self.user_gpus[h.owner] -= len(h.gpu_indices)
        self.user_jobs[h.owner] -= 1
        if not self.user_jobs[h.owner]:
            del self.user_jobs[h.owner]
            del self.user_gpus[h.owner]
