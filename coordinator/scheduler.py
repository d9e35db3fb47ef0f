"""Placement of waiting jobs onto agents: pure functions over a snapshot, no I/O.

One pass walks the queue in order (priority, then submission time) and places every job that fits
somewhere now (backfilling past jobs that do not). Among the agents that fit, it picks the tightest
(best fit: fewest GPUs, then CPU and memory, left over), so large GPU jobs are not starved by small
jobs scattered over every host.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

GIB = 1 << 30


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory: int


@dataclass(frozen=True)
class JobRequest:
    job_id: str
    cpu: float = 0.0
    memory: int = 0
    gpu_count: int = 0
    gpu_name: str = ""
    gpu_memory: int = 0
    needs_container: bool = False  # the docker provider: only agents whose runtime runs containers
    # For ordering and estimates (coordinator/planner.py): whose job, its run's --priority, when it
    # was submitted, what its recent durations are filed under, and its own time limit if it has one.
    owner: str = ""
    priority: int = 0
    submitted_at: int = 0
    duration_key: str = ""
    max_duration_s: float | None = None
    avoid_agent: str = ""  # a new attempt's last agent (it was lost there): placed elsewhere when another fits
    # A member of a multi-node gang (coordinator/gangs.py): the gang's key, unique across runs, its
    # size and this member's rank. A gang is placed whole, on distinct agents, or not at all.
    gang: str = ""
    nnodes: int = 1
    node_rank: int = 0


@dataclass
class AgentState:
    agent_id: str
    name: str
    cpu_total: float
    memory_total: int
    gpus: list[Gpu]
    max_jobs: int
    containers: bool = False  # its runtime runs containers (docker)
    used_cpu: float = 0.0
    used_memory: int = 0
    busy_gpus: set[int] = field(default_factory=set)
    jobs: int = 0
    address: str = ""  # where other agents reach it (a gang's MASTER_ADDR when it runs rank 0)
    # Why it takes no new job for now, e.g. "disk full: 3 MiB free in /var/lib/dstack/jobs" (its own word:
    # agent/diskspace.py); "": it takes jobs. Its capacity still counts for what could ever fit (never_fits):
    # jobs wait for it, they do not fail as unschedulable.
    draining: str = ""

    def hold(self, cpu: float, memory: int, gpu_indices: Iterable[int]) -> None:
        """Counts a job's CPU, memory and GPUs as taken on this agent."""
        self.used_cpu += cpu
        self.used_memory += memory
        self.busy_gpus.update(gpu_indices)
        self.jobs += 1

    def can_run(self, req: JobRequest) -> bool:
        return self.containers or not req.needs_container

    def matching_gpus(self, req: JobRequest, free_only: bool) -> list[Gpu]:
        return [
            g
            for g in self.gpus
            if (not free_only or g.index not in self.busy_gpus)
            and (not req.gpu_name or req.gpu_name.lower() in g.name.lower())
            and g.memory >= req.gpu_memory
        ]


@dataclass
class Decision:
    placements: list[tuple[str, str, list[int]]] = field(default_factory=list)  # job, agent, gpus
    waiting: dict[str, str] = field(default_factory=dict)  # job -> reason
    impossible: dict[str, str] = field(default_factory=dict)  # job -> reason


def describe(req: JobRequest) -> str:
    parts = []
    if req.gpu_count:
        gpu = f"{req.gpu_count} GPU" + ("s" if req.gpu_count > 1 else "")
        if req.gpu_name:
            gpu = f"{req.gpu_count} x {req.gpu_name}"
        if req.gpu_memory:
            gpu += f" with >= {req.gpu_memory / GIB:g} GiB"
        parts.append(gpu)
    if req.cpu:
        parts.append(f"{req.cpu:g} CPU")
    if req.memory:
        parts.append(f"{req.memory / GIB:g} GiB memory")
    return ", ".join(parts) or "a job slot"


def never_fits(req: JobRequest, agents: list[AgentState]) -> str | None:
    """Why no agent could run the job even when idle, or None if one could."""
    if any(
        a.can_run(req)
        and len(a.matching_gpus(req, free_only=False)) >= req.gpu_count
        and a.cpu_total >= req.cpu
        and a.memory_total >= req.memory
        for a in agents
    ):
        return None
    need = describe(req)
    agents = [a for a in agents if a.can_run(req)]
    if not agents:
        return "needs an agent with the docker runtime; every agent runs host processes"
    if req.gpu_count:
        best = max(len(a.matching_gpus(req, free_only=False)) for a in agents)
        if best < req.gpu_count:
            what = "GPU" if best == 1 else "GPUs"
            if req.gpu_name or req.gpu_memory:
                what = f"matching {what} ({_gpu_names(agents)})"
            return f"needs {need}; the largest agent has {best} {what}"
    if req.cpu and max(a.cpu_total for a in agents) < req.cpu:
        return f"needs {need}; the largest agent has {max(a.cpu_total for a in agents):g} CPU"
    if req.memory and max(a.memory_total for a in agents) < req.memory:
        most = max(a.memory_total for a in agents) / GIB
        return f"needs {need}; the largest agent has {most:.1f} GiB memory"
    return f"needs {need}; no single agent has all of it"


def _gpu_names(agents: list[AgentState]) -> str:
    names = sorted({g.name for a in agents for g in a.gpus})
    return "agents have " + ", ".join(names) if names else "no agent has a GPU"


def _fits(a: AgentState, req: JobRequest) -> list[int] | None:
    if a.draining or a.jobs >= a.max_jobs or not a.can_run(req):
        return None
    if a.cpu_total - a.used_cpu < req.cpu - 1e-9 or a.memory_total - a.used_memory < req.memory:
        return None
    free = a.matching_gpus(req, free_only=True)
    if len(free) < req.gpu_count:
        return None
    return [g.index for g in sorted(free, key=lambda g: g.index)[: req.gpu_count]]


def gang_never_fits(req: JobRequest, agents: list[AgentState]) -> str | None:
    """Why no `req.nnodes` distinct agents could run a gang's members even when idle, or None."""
    able = [a for a in agents if never_fits(req, [a]) is None]
    if len(able) >= req.nnodes:
        return None
    why = never_fits(req, agents) if not able else None
    have = f"{len(able)} agent" + ("" if len(able) == 1 else "s") + " could ever run one"
    return f"needs {req.nnodes} agents with {describe(req)}; {have}" + (f" ({why})" if why else "")


def place_gang(members: list[JobRequest], pool: Iterable[AgentState]) -> list[tuple[str, str, list[int]]] | None:
    """All of a gang's members on distinct agents of `pool` (job, agent, GPUs), held there; or None,
    with nothing held, when fewer agents than members have room now. Members are alike, so any agent
    that fits one fits any: the best fits are taken, rank 0 the tightest."""
    first = members[0]
    candidates = [(a, gpus) for a in pool if (gpus := _fits(a, first)) is not None]
    if len(candidates) < len(members):
        return None
    candidates.sort(key=lambda c: (c[0].agent_id == first.avoid_agent, _leftover(c[0], first), c[0].agent_id))
    out = []
    for req, (agent, gpus) in zip(sorted(members, key=lambda r: r.node_rank), candidates, strict=False):
        agent.hold(req.cpu, req.memory, gpus)
        out.append((req.job_id, agent.agent_id, gpus))
    return out


def gang_fits_now(req: JobRequest, pool: Iterable[AgentState]) -> int:
    """How many agents of `pool` have room for one of the gang's members now."""
    return sum(1 for a in pool if _fits(a, req) is not None)


def _leftover(a: AgentState, req: JobRequest) -> tuple[int, float, int]:
    return (
        len(a.gpus) - len(a.busy_gpus) - req.gpu_count,
        a.cpu_total - a.used_cpu - req.cpu,
        a.memory_total - a.used_memory - req.memory,
    )


BUSY_SHOWN = 5  # agents named in a waiting job's reason; a pool of thousands is summed up after them


def _busy_summary(agents: list[AgentState]) -> str:
    # Bounded: every waiting job of the shape carries this text (`dstack ps`, ListRuns pages), and one
    # naming each of 5,000 agents made a page of 1,000 runs 47 MB.
    parts = []
    # Draining agents first: a job that waits only for them says why (their disk is full), not just "busy".
    draining = [a for a in agents if a.draining]
    shown = (draining + [a for a in agents if not a.draining])[:BUSY_SHOWN] if draining else agents[:BUSY_SHOWN]
    for a in shown:
        if a.draining:
            parts.append(f"{a.name} (draining: {a.draining})")
        elif a.gpus:
            parts.append(f"{a.name} ({len(a.busy_gpus)}/{len(a.gpus)} GPUs)")
        else:
            parts.append(f"{a.name} ({a.jobs} jobs, {a.used_cpu:g}/{a.cpu_total:g} CPU)")
    if len(agents) > BUSY_SHOWN:
        parts.append(f"and {len(agents) - BUSY_SHOWN:,} more")
    return ", ".join(parts)


def schedule(queue: list[JobRequest], agents: list[AgentState]) -> Decision:
    """Places what fits now; `agents` is updated in place with the placements made. Every job on its
    own: gangs (multi-node jobs) are placed by coordinator/planner.py's `plan`, which the engine uses."""
    d = Decision()
    if not queue:
        return d
    if not agents:
        for req in queue:
            d.waiting[req.job_id] = "waiting: no agent is online"
        return d
    never: dict[tuple[float, int, int, str, int, bool], str | None] = {}
    unfit: dict[tuple[float, int, int, str, int, bool], str] = {}
    for req in queue:
        # Jobs of the same shape share every answer within a pass; and once a shape fits nowhere
        # it fits nowhere for the rest of the pass (placements only take capacity away).
        shape = (req.cpu, req.memory, req.gpu_count, req.gpu_name, req.gpu_memory, req.needs_container)
        if shape not in never:
            never[shape] = never_fits(req, agents)
        reason = never[shape]
        if reason is not None:
            d.impossible[req.job_id] = reason
            continue
        if shape in unfit:
            d.waiting[req.job_id] = unfit[shape]
            continue
        candidates = [(a, gpus) for a in agents if (gpus := _fits(a, req)) is not None]
        if not candidates:
            unfit[shape] = f"waiting: {describe(req)} free on no agent; busy: {_busy_summary(agents)}"
            d.waiting[req.job_id] = unfit[shape]
            continue
        agent, gpus = min(candidates, key=lambda c: (c[0].agent_id == req.avoid_agent, _leftover(c[0], req)))
        agent.hold(req.cpu, req.memory, gpus)
        d.placements.append((req.job_id, agent.agent_id, gpus))
    return d
