"""Who is preempted for whom: the one preemption policy, pure over a snapshot (no I/O, no clock).

The mechanism is `Engine.preempt` (SIGTERM, grace, artifacts saved, requeued as a new attempt); the
engine asks `choose` once per lease tick and applies what it returns. Two causes, checked for each
waiting job that is not interruptible (oldest first); the first job that needs a preemption gets it:

- reservation: the job has waited longer than `--reserve-after` and fits on no agent now. When the
  planner holds an agent for it, only that agent's jobs are candidates (it then starts there at once
  instead of waiting for the agent to drain; the planner keeps everything else, the requeued attempts
  included, off a reserved agent until its job starts). Without a reservation, any one agent.
- fair share: the job has waited longer than `--preempt-after`, fits on no agent now, and its user
  is below their fair share against the victims' users. Hysteresis, so two users never take GPUs back
  and forth: a victim's user must have a usage/share more than `margin` times the waiting user's
  (and above zero). Once the waiting user's job runs, their usage grows and the victim's user waits
  with a lower key, but for the victim's user to preempt back, the first user must have grown past
  `margin` times theirs: equal users never preempt each other. A user's jobs are never preempted for
  that same user by fair share (a user orders their own jobs with --priority).

The agent whose jobs are preempted is then held for the job (the engine adds it to the planner's
reservations), so nothing else, the preempted jobs' next attempts included, takes the room first.

Always: only for a job its owner's quota lets start (room freed for any other would sit idle); only
interruptible jobs; none in its first `min_run_s` (so it can write a checkpoint); the
fewest jobs of one agent that let the job fit (the smallest such set; see `_fewest`); jobs already stopping
for a preemption count as gone, so a job waiting for its victims to end takes no more.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from dstack.coordinator.planner import UserLimits, _over_quota
from dstack.coordinator.scheduler import AgentState, JobRequest, _fits, never_fits

NS = 1_000_000_000
RESERVATION = "reservation"
FAIR_SHARE = "fair share"


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
    owner: str = ""
    started_ns: int = 0  # when it started running (0: not yet: too young to preempt)


@dataclass(frozen=True)
class Rules:
    now_ns: int
    reserve_after_s: float = 300.0  # inf: no preemption for reservations
    preempt_after_s: float = 60.0  # inf: no preemption for fair share
    min_run_s: float = 60.0
    margin: float = 2.0
    fairshare: bool = True
    usage: Mapping[str, float] = field(default_factory=dict)  # decayed GPU-seconds per user
    shares: Mapping[str, float] = field(default_factory=dict)  # per user; 1 when absent
    reservations: Mapping[str, str] = field(default_factory=dict)  # job -> agent, from the planner
    limits: Mapping[str, UserLimits] = field(default_factory=dict)  # quotas, per user


@dataclass(frozen=True)
class Preemption:
    for_job: str
    for_owner: str
    cause: str  # RESERVATION or FAIR_SHARE
    victims: tuple[str, ...]
    agent_id: str  # where the victims run: held for `for_job` until it starts there


def key(rules: Rules, user: str) -> float:
    """A user's usage against their share (lower: further below their fair share)."""
    return rules.usage.get(user, 0.0) / max(rules.shares.get(user, 1.0), 1e-9)


def _release(a: AgentState, j: RunningJob) -> None:
    a.used_cpu -= j.cpu
    a.used_memory -= j.memory
    a.busy_gpus.difference_update(j.gpu_indices)
    a.jobs -= 1


def victims_for(
    req: JobRequest,
    agents: Sequence[AgentState],
    running: Sequence[RunningJob],
    may_preempt: Callable[[RunningJob], bool] = lambda j: True,
    only_agent: str | None = None,
) -> list[str]:
    """The interruptible jobs (ids) that `may_preempt` allows, on one agent (`only_agent` if given),
    to preempt so that `req` fits there; none when it fits somewhere already (counting jobs being
    preempted as gone), never fits, or cannot fit even so."""
    return _victims_on(req, agents, running, may_preempt, only_agent)[1]


def _victims_on(
    req: JobRequest,
    agents: Sequence[AgentState],
    running: Sequence[RunningJob],
    may_preempt: Callable[[RunningJob], bool],
    only_agent: str | None,
) -> tuple[str, list[str]]:
    """(agent, victims) as `victims_for` says; ("", []) for none. Costs the agents and the running jobs
    once each (issue 16: every agent was copied, and every running job looked at for every agent, at
    each call: at 2,000 agents, ~0.4 s a check with a single interruptible job running)."""
    if never_fits(req, list(agents)) is not None:
        return "", []
    # The agents as they would be with the jobs being preempted gone: a copy only where that differs.
    freed = {a.agent_id: a for a in agents}
    copied: set[str] = set()
    mine: dict[str, list[RunningJob]] = {}  # per agent: the jobs there that may be preempted for `req`
    for j in running:
        if j.agent_id not in freed:
            continue
        if j.being_preempted:
            if j.agent_id not in copied:
                freed[j.agent_id] = copy.deepcopy(freed[j.agent_id])
                copied.add(j.agent_id)
            _release(freed[j.agent_id], j)
        elif j.interruptible and may_preempt(j):
            mine.setdefault(j.agent_id, []).append(j)
    if any(_fits(a, req) is not None for a in freed.values()):
        return "", []
    best: list[str] | None = None
    where = ""
    for agent_id, state in freed.items():
        if only_agent is not None and agent_id != only_agent:
            continue
        if agent_id not in mine or not state.can_run(req):
            continue  # (no candidates: `_fewest` finds none)
        candidates = sorted(mine[agent_id], key=lambda j: (len(j.gpu_indices), j.cpu, j.memory, j.job_id))
        chosen = _fewest(state, req, candidates, len(best) - 1 if best is not None else len(candidates))
        if chosen is not None:
            best, where = chosen, agent_id
    return (where, best) if best else ("", [])


EXHAUSTIVE = 8  # up to this many candidates on an agent, every subset is tried (2^8 fits at most)


def _fewest(state: AgentState, req: JobRequest, candidates: list[RunningJob], most: int) -> list[str] | None:
    """The fewest of `candidates` (at most `most`) whose going lets `req` fit on `state`; smallest jobs
    first among sets of one size (the least work lost). Exhaustive for a few candidates; beyond that,
    any single job, else the biggest first until it fits (a near-minimal set, cheaply)."""
    if most < 1 or not candidates:
        return None
    everything = copy.deepcopy(state)
    for j in candidates:
        _release(everything, j)
    if _fits(everything, req) is None:
        return None  # not even all of them would do (the usual miss: cheap)
    limit = min(most, len(candidates)) if len(candidates) <= EXHAUSTIVE else 1
    for k in range(1, limit + 1):
        for combo in itertools.combinations(candidates, k):
            trial = copy.deepcopy(state)
            for j in combo:
                _release(trial, j)
            if _fits(trial, req) is not None:
                return [j.job_id for j in combo]
    if len(candidates) <= EXHAUSTIVE:
        return None
    trial, chosen = copy.deepcopy(state), []
    for j in reversed(candidates):
        _release(trial, j)
        chosen.append(j.job_id)
        if len(chosen) > most:
            return None
        if _fits(trial, req) is not None:
            return chosen
    return None


def choose(
    waiting: Sequence[JobRequest], agents: Sequence[AgentState], running: Sequence[RunningJob], rules: Rules
) -> Preemption | None:
    """The first waiting job (in the given order: oldest first) that a preemption lets start, and the
    jobs to preempt for it (see the module's docstring); None when none should be preempted."""
    if not any(j.interruptible and not j.being_preempted for j in running):
        return None
    min_run_ns = rules.min_run_s * NS

    def old_enough(j: RunningJob) -> bool:
        return j.started_ns > 0 and rules.now_ns - j.started_ns >= min_run_ns

    held_gpus: dict[str, int] = {}
    held_jobs: dict[str, int] = {}
    for j in running:
        held_gpus[j.owner] = held_gpus.get(j.owner, 0) + len(j.gpu_indices)
        held_jobs[j.owner] = held_jobs.get(j.owner, 0) + 1
    missed: set[tuple[object, ...]] = set()  # (cause, shape, owner, agent) that found nothing this call
    for req in waiting:
        waited_s = (rules.now_ns - req.submitted_at) / NS
        lim = rules.limits.get(req.owner) or UserLimits()
        if _over_quota(lim, held_gpus.get(req.owner, 0), held_jobs.get(req.owner, 0), req.gpu_count):
            continue  # its owner's quota holds it back: room freed for it would sit idle
        shape = (req.cpu, req.memory, req.gpu_count, req.gpu_name, req.gpu_memory, req.needs_container)
        held_for = rules.reservations.get(req.job_id)
        tried = (RESERVATION, shape, held_for)
        if not math.isinf(rules.reserve_after_s) and waited_s >= rules.reserve_after_s and tried not in missed:
            where, ids = _victims_on(req, agents, running, old_enough, held_for)
            if ids:
                return Preemption(req.job_id, req.owner, RESERVATION, tuple(ids), where)
            missed.add(tried)
        tried = (FAIR_SHARE, shape, req.owner)
        if (
            rules.fairshare
            and not math.isinf(rules.preempt_after_s)
            and waited_s >= rules.preempt_after_s
            and tried not in missed
        ):
            mine = key(rules, req.owner)

            def below_share(j: RunningJob, owner: str = req.owner, mine: float = mine) -> bool:
                theirs = key(rules, j.owner)
                return j.owner != owner and theirs > 0 and theirs > rules.margin * mine and old_enough(j)

            where, ids = _victims_on(req, agents, running, below_share, None)
            if ids:
                return Preemption(req.job_id, req.owner, FAIR_SHARE, tuple(ids), where)
            missed.add(tried)
    return None
