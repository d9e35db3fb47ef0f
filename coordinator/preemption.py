"""Which interruptible jobs to preempt so that a job that has waited too long can start.

The mechanism is `Engine.preempt` (SIGTERM, grace, artifacts saved, requeued as a new attempt);
this is the minimal policy that uses it today, pure over a snapshot (no I/O, no clock):

A job that is not interruptible, has waited longer than `--reserve-after`, and fits on no agent
now, gets the fewest interruptible jobs of one agent preempted such that it would fit there (those
with the most GPUs first). Jobs already stopping for a preemption count as gone, so a job that is
waiting for its victims to end does not take more. Fair share and reservations (the planner) decide
who runs when; they call the same entry point for their own preemptions, and a reservation keeps
the preempted jobs' next attempts off the host while the job it was freed for waits to start.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from dstack.coordinator.scheduler import AgentState, JobRequest, _fits, never_fits


@dataclass(frozen=True)
class RunningJob:
    """A job on an agent, as preemption sees it."""

    job_id: str
    agent_id: str
    cpu: float
    memory: int
    gpu_indices: tuple[int, ...]
    interruptible: bool
    being_preempted: bool  # asked to stop for a preemption already


def _release(a: AgentState, j: RunningJob) -> None:
    a.used_cpu -= j.cpu
    a.used_memory -= j.memory
    a.busy_gpus.difference_update(j.gpu_indices)
    a.jobs -= 1


def victims_for(req: JobRequest, agents: Sequence[AgentState], running: Sequence[RunningJob]) -> list[str]:
    """The interruptible jobs (ids) to preempt on one agent so that `req` fits there; none when it
    fits somewhere already (counting jobs being preempted as gone), never fits, or cannot fit even so."""
    if never_fits(req, list(agents)) is not None:
        return []
    freed = {a.agent_id: copy.deepcopy(a) for a in agents}
    for j in running:
        if j.being_preempted and j.agent_id in freed:
            _release(freed[j.agent_id], j)
    if any(_fits(a, req) is not None for a in freed.values()):
        return []
    best: list[str] | None = None
    for agent_id, state in freed.items():
        if not state.can_run(req):
            continue
        candidates = sorted(
            (j for j in running if j.agent_id == agent_id and j.interruptible and not j.being_preempted),
            key=lambda j: (-len(j.gpu_indices), -j.cpu, -j.memory, j.job_id),
        )
        trial, chosen = copy.deepcopy(state), []
        for j in candidates:
            _release(trial, j)
            chosen.append(j.job_id)
            if _fits(trial, req) is not None:
                if best is None or len(chosen) < len(best):
                    best = list(chosen)
                break
    return best or []
