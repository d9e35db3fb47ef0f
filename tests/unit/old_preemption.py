"""The preemption check as it was before issue 16's cut (`Engine._victims` reading and parsing every
long-waiting job's row, `preemption._victims_on` copying every agent and looking at every running job for
each): kept as the oracle that the faster check's decisions are tested against
(tests/unit/test_preemption_candidates.py). Copied from commit e30c05a, unchanged but for names."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import replace

from dstack.coordinator.convert import job_spec_from_bytes
from dstack.coordinator.elapsed import NS
from dstack.coordinator.engine import Engine
from dstack.coordinator.planner import UserLimits, _over_quota
from dstack.coordinator.preemption import (
    FAIR_SHARE,
    RESERVATION,
    Preemption,
    Rules,
    RunningJob,
    _fewest,
    _release,
    key,
)
from dstack.coordinator.queue import request_of
from dstack.coordinator.scheduler import AgentState, JobRequest, _fits, never_fits


def victims(self: Engine, connected: set[str], waited_long: list[str]) -> tuple[Preemption, str] | None:
    """What the policy preempts now, and the name of the job it is for (DB thread). `waited_long`:
    the jobs that waited long enough (on the monotonic clock)."""
    cfg = self.config
    now = self.clock.time_ns()
    # Times as `now` minus a monotonic duration, so that the policy's wall-clock arithmetic reads
    # durations that a step of the wall clock cannot change.
    running = [
        replace(j, started_ns=now - self._ran_ns(j.job_id, j.started_ns)) if j.started_ns else j
        for j in self.store.running_for_preemption()
    ]
    if not any(j.interruptible and not j.being_preempted for j in running):
        return None
    starved = [
        replace(w, submitted_at=now - int(self.waits.waited_s(w.id) * NS))
        for w in self.store.starved_among(waited_long)
    ]
    if not starved:
        return None
    rules = Rules(
        now_ns=now,
        reserve_after_s=cfg.reserve_after_s,
        preempt_after_s=cfg.preempt_after_s,
        min_run_s=cfg.preempt_min_run_s,
        margin=cfg.preempt_margin,
        fairshare=cfg.fairshare,
        usage=self.last_usage,
        shares={u: lim.share for u, lim in self._user_limits().items()},
        reservations=self._held(),
        limits=self._user_limits(),
    )
    # A gang's member alone is no reason to preempt: freeing one agent for it would not start the gang.
    specs = [(w, job_spec_from_bytes(w.spec)) for w in starved]
    reqs = [
        request_of(w.id, spec, w.owner, w.priority, w.submitted_at, "", w.avoid_agent)
        for w, spec in specs
        if not spec.gang
    ]
    if not reqs:
        return None
    choice = choose(reqs, list(self._agent_states(connected).values()), running, rules)
    if choice is None:
        return None
    self.preempted_for[choice.for_job] = choice.agent_id
    w = next(w for w in starved if w.id == choice.for_job)
    return choice, f"{w.run_name}/{w.job_name}" if w.job_name else w.run_name


def _victims_on(
    req: JobRequest,
    agents: Sequence[AgentState],
    running: Sequence[RunningJob],
    may_preempt: Callable[[RunningJob], bool],
    only_agent: str | None,
) -> tuple[str, list[str]]:
    """(agent, victims) as `victims_for` says; ("", []) for none."""
    if never_fits(req, list(agents)) is not None:
        return "", []
    freed = {a.agent_id: copy.deepcopy(a) for a in agents}
    for j in running:
        if j.being_preempted and j.agent_id in freed:
            _release(freed[j.agent_id], j)
    if any(_fits(a, req) is not None for a in freed.values()):
        return "", []
    best: list[str] | None = None
    where = ""
    for agent_id, state in freed.items():
        if only_agent is not None and agent_id != only_agent:
            continue
        if not state.can_run(req):
            continue
        candidates = sorted(
            (
                j
                for j in running
                if j.agent_id == agent_id and j.interruptible and not j.being_preempted and may_preempt(j)
            ),
            key=lambda j: (len(j.gpu_indices), j.cpu, j.memory, j.job_id),
        )
        chosen = _fewest(state, req, candidates, len(best) - 1 if best is not None else len(candidates))
        if chosen is not None:
            best, where = chosen, agent_id
    return (where, best) if best else ("", [])


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
