"""One scheduling pass with fair share, quotas, reservations, and why/when for every waiting job.

Pure functions over a snapshot (no I/O, no clock: `now_ns` is given), on top of scheduler.py's
placement primitives (best fit over AgentState).

Order. With fair share on, users take turns by usage / share (lower first): each user's jobs in
the user's own order (`--priority` higher first, then submission), and each job taken from a user
adds its expected cost (weight x expected duration) to that user's usage for the rest of the pass,
so one pass interleaves users the way their usage will evolve instead of handing every free GPU to
whoever was lowest when it began. With fair share off, the order is priority then submission (FIFO).

Reservations. A job that has waited longer than `reserve_after` and fits nowhere now, and is bigger
than the smallest waiting job (only a big job can be starved by small ones backfilling), reserves
one agent: the one expected to have room for it soonest (its running jobs' expected ends). No other
job is placed there; the job starts there as soon as it drains. A reservation stays on its agent
from pass to pass while the job waits and the agent is online.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import math
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TypeVar

from dstack.coordinator.fairshare import weight
from dstack.coordinator.scheduler import (
    BUSY_SHOWN,
    AgentState,
    Decision,
    JobRequest,
    _busy_summary,
    _fits,
    _leftover,
    describe,
    gang_fits_now,
    gang_never_fits,
    never_fits,
    place_gang,
)

log = logging.getLogger(__name__)
NS = 1_000_000_000
T = TypeVar("T")
# A job whose duration nobody can guess yet is charged this long within a pass's turn-taking.
UNKNOWN_DURATION_S = 3600.0
# Estimated start times are worked out for this many waiting jobs in order; later ones read "unknown"
# (a guess that far down the queue would mislead anyway, and the pass stays cheap).
ETA_LIMIT = 500

# Why a job waits (client_pb2.Job.wait_reason).
FAIR_SHARE = "fair-share"
QUOTA = "quota"
RESERVATION = "reservation"
RESOURCES = "resources"
NEVER_FITS = "never-fits"
DEPENDENCIES = "dependencies"


@dataclass(frozen=True)
class UserLimits:
    share: float = 1.0
    max_gpus: int = 0  # 0: no limit
    max_running: int = 0  # 0: no limit


@dataclass(frozen=True)
class RunningJob:
    """A job on an agent, holding what it holds until its expected end."""

    job_id: str
    agent_id: str
    owner: str
    cpu: float
    memory: int
    gpu_indices: tuple[int, ...]
    started_ns: int  # when it started (or was placed, if it has not started yet)
    expected_end_ns: int | None  # None: unknown


@dataclass(frozen=True)
class Policy:
    now_ns: int
    fairshare: bool = True
    usage: Mapping[str, float] = field(default_factory=dict)  # decayed GPU-seconds now, per user
    limits: Mapping[str, UserLimits] = field(default_factory=dict)
    reserve_after_s: float = 300.0
    reservations: Mapping[str, str] = field(default_factory=dict)  # job -> agent, from the last pass
    durations: Mapping[str, float] = field(default_factory=dict)  # duration_key -> recent median, seconds
    # How long a job has waited, in seconds on the monotonic clock (the engine's coordinator/elapsed.py);
    # None: `now_ns - submitted_at`, which a step of the wall clock changes.
    waited_s: Callable[[str], float] | None = None


@dataclass(frozen=True)
class WaitInfo:
    position: int  # 1-based, in the order this pass used
    reason: str  # one of the constants above
    message: str
    eta_ns: int  # 0: unknown


class WaitInfos(MutableMapping[str, WaitInfo]):
    """Each waiting job's `WaitInfo`, kept as its four fields in four plain dicts of strings and ints.

    Why not the objects themselves (issue 16): a full pass over a deep queue makes one for each of
    100,000 jobs, every second or so, and keeps them until the next. As objects they outlived the young
    generations, so each pass promoted 100,000 objects to the old one, which brought the next full
    collection (the whole heap walked, the event loop stopped) that much nearer. (A NamedTuple or
    dataclass stays tracked.) Why not one dict of plain tuples, as before: a new tuple is tracked until
    its first collection, so the dict holding it was tracked too until a full collection untracked it,
    and a full collection during the pass (bench/memprobe.py's census at a quarter of full size found it
    in 4 of 10) followed its 25,000 references, each a cache miss. A dict holding only strings and ints
    is never tracked at all. A `WaitInfo` is built when one is read.

    Estimated starts may come later (`estimate_later`): worked out when one is first read, from the
    pass's own snapshot. Below FULL_QUEUE every pass is a full one, and in a drain they were about half
    of each (issue 16): a pass whose infos nobody reads before the next pass replaces them never works
    them out. They are no input to any placement, so nothing placed changes."""

    __slots__ = ("_eta_ns", "_later", "_lock", "_message", "_position", "_reason")

    def __init__(self) -> None:
        self._position: dict[str, int] = {}
        self._reason: dict[str, str] = {}
        self._message: dict[str, str] = {}
        self._eta_ns: dict[str, int] = {}
        # Estimates still to work out, in the order they were added (a later one wins), each a
        # job -> eta_ns of some of the jobs here; emptied once they are in `_eta_ns`.
        self._later: list[Callable[[], Mapping[str, int]]] = []
        self._lock = threading.Lock()

    def estimate_later(self, estimates: Callable[[], Mapping[str, int]]) -> None:
        """Estimated starts of jobs already here (their eta_ns 0 until then), worked out at first read."""
        self._later.append(estimates)

    def _settle(self) -> None:
        """The estimates still to work out, in: the event loop (listings) and the DB thread may both
        read, so under a lock, and `_later` is emptied only once they are all in."""
        if not self._later:
            return
        with self._lock:
            for estimates in self._later:
                position, eta_ns = self._position, self._eta_ns
                try:
                    worked_out = estimates()
                except Exception:  # never lose the reasons over it (a KeyError would read as no info at all)
                    log.exception("working out estimated starts failed; they read unknown")
                    worked_out = {}
                for job_id, eta in worked_out.items():
                    if job_id in position:  # not one removed since
                        eta_ns[job_id] = eta
            self._later = []

    def __getitem__(self, job_id: str) -> WaitInfo:
        self._settle()
        return WaitInfo(self._position[job_id], self._reason[job_id], self._message[job_id], self._eta_ns[job_id])

    def __setitem__(self, job_id: str, info: WaitInfo) -> None:
        self._settle()  # an estimate to come must not overwrite this one
        self._position[job_id] = info.position
        self._reason[job_id] = info.reason
        self._message[job_id] = info.message
        self._eta_ns[job_id] = info.eta_ns

    def __delitem__(self, job_id: str) -> None:
        del self._position[job_id]
        del self._reason[job_id], self._message[job_id], self._eta_ns[job_id]

    def discard(self, job_id: str) -> None:
        """Drops a job's info if it has one (no estimate is worked out for it: `pop` would read it)."""
        if job_id in self._position:
            del self[job_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._position)

    def __len__(self) -> int:
        return len(self._position)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._position

    def merge(self, other: WaitInfos) -> None:
        """`update` from another, as one update of each dict (not one `__setitem__` per job); the
        other's estimates still to come come here too."""
        self._settle()
        self._position.update(other._position)
        self._reason.update(other._reason)
        self._message.update(other._message)
        self._eta_ns.update(other._eta_ns)
        self._later.extend(other._later)

    def columns(self) -> tuple[dict[str, int], dict[str, str], dict[str, str], dict[str, int]]:
        """The four dicts (what a test checks is never tracked)."""
        self._settle()
        return self._position, self._reason, self._message, self._eta_ns


@dataclass
class Plan(Decision):
    info: WaitInfos = field(default_factory=WaitInfos)
    reservations: dict[str, str] = field(default_factory=dict)  # job -> agent


def limits_of(policy: Policy, user: str) -> UserLimits:
    return policy.limits.get(user) or UserLimits()


def expected_s(req: JobRequest, policy: Policy) -> float | None:
    """How long the job is expected to run: its own limit, else its recent runs' median, else None."""
    if req.max_duration_s:
        return req.max_duration_s
    return policy.durations.get(req.duration_key)


def own_key(req: JobRequest) -> tuple[int, int]:
    """A user's own order: `--priority` higher first, then submission (then arrival, kept by the caller)."""
    return (-req.priority, req.submitted_at)


def order(queue: Sequence[JobRequest], policy: Policy) -> list[JobRequest]:
    """The order the pass walks the queue in (see the module's docstring)."""
    own = sorted(range(len(queue)), key=lambda i: (-queue[i].priority, queue[i].submitted_at, i))
    per_user: dict[str, list[JobRequest]] = {}
    for i in own:
        per_user.setdefault(queue[i].owner, []).append(queue[i])
    if not policy.fairshare:
        return [queue[i] for i in own]
    return list(lazy_order(per_user, policy))


def lazy_order(
    per_user: Mapping[str, Sequence[JobRequest]],
    policy: Policy,
    include: Callable[[JobRequest], bool] | None = None,
    dropped: set[str] | frozenset[str] = frozenset(),
    arrival: Callable[[JobRequest], int] | None = None,
) -> Iterator[JobRequest]:
    return lazy_order_of(per_user, _itself, policy, include, dropped, arrival)


def _itself(req: JobRequest) -> JobRequest:
    return req


def lazy_order_of(
    per_user: Mapping[str, Sequence[T]],
    request: Callable[[T], JobRequest],
    policy: Policy,
    include: Callable[[T], bool] | None = None,
    dropped: set[str] | frozenset[str] = frozenset(),
    arrival: Callable[[T], int] | None = None,
) -> Iterator[T]:
    """`order`, one job at a time, from each user's jobs already in their own order (`own_key`, then
    arrival): a pass that stops after its first placements costs those, not a sort of the whole queue.
    `include`: asked once per job, in order, whether it takes part (a job blocked by its dependencies
    does not, and is charged no turn); `dropped`: users the caller needs no more jobs of (over a
    quota), which the caller may add to while walking. With fair share off, users' jobs merge by
    `own_key`, then `arrival` (the queue's own order: a tie between users' jobs goes to the earlier).
    `lazy_order_of`: the same over items the jobs are `request(item)` of (the queue's entries)."""
    if not policy.fairshare:
        yield from _merged(per_user, request, include, dropped, arrival or (lambda r: 0))
        return
    shares = {user: max(limits_of(policy, user).share, 1e-9) for user in per_user}
    nexts: dict[str, int] = {}

    def advance(user: str, i: int) -> int:
        jobs = per_user[user]
        while i < len(jobs) and include is not None and not include(jobs[i]):
            i += 1
        return i

    heap: list[tuple[float, int, int, str]] = []
    for user, jobs in per_user.items():
        i = advance(user, 0)
        nexts[user] = i
        if i < len(jobs):
            first = request(jobs[i])
            heap.append((policy.usage.get(user, 0.0) / shares[user], -first.priority, first.submitted_at, user))
    heapq.heapify(heap)
    while heap:
        key, _, _, user = heapq.heappop(heap)
        if user in dropped:
            continue
        jobs, share, i = per_user[user], shares[user], nexts[user]
        rival = heap[0][0] if heap else math.inf
        # The user keeps the turn while their key stays the lowest (one heap operation per turn).
        while i < len(jobs):
            item = jobs[i]
            yield item
            req = request(item)
            i = advance(user, i + 1)
            key += weight(req.gpu_count, req.cpu) * (expected_s(req, policy) or UNKNOWN_DURATION_S) / share
            if key > rival or user in dropped:
                break
        nexts[user] = i
        if i < len(jobs) and user not in dropped:
            nxt = request(jobs[i])
            heapq.heappush(heap, (key, -nxt.priority, nxt.submitted_at, user))


def _merged(
    per_user: Mapping[str, Sequence[T]],
    request: Callable[[T], JobRequest],
    include: Callable[[T], bool] | None,
    dropped: set[str] | frozenset[str],
    arrival: Callable[[T], int],
) -> Iterator[T]:
    """Priority, then submission, then arrival, across users; within a user, the list's own order."""
    heap: list[tuple[int, int, int, int, str]] = []
    users = list(per_user)
    for u, user in enumerate(users):
        jobs = per_user[user]
        if jobs:
            first = request(jobs[0])
            heap.append((-first.priority, first.submitted_at, arrival(jobs[0]), u, user))
    heapq.heapify(heap)
    pos = dict.fromkeys(users, 0)
    while heap:
        _, _, _, u, user = heapq.heappop(heap)
        if user in dropped:
            continue
        jobs, i = per_user[user], pos[user]
        item = jobs[i]
        pos[user] = i + 1
        if i + 1 < len(jobs):
            nxt = request(jobs[i + 1])
            heapq.heappush(heap, (-nxt.priority, nxt.submitted_at, arrival(jobs[i + 1]), u, user))
        if include is None or include(item):
            yield item


def _size(req: JobRequest) -> tuple[int, float, int]:
    return (req.gpu_count, req.cpu, req.memory)


Shape = tuple[float, int, int, str, int, bool]


def shape_of(req: JobRequest) -> Shape:
    """What placement looks at: jobs of one shape fit (or not) on the same agents."""
    return (req.cpu, req.memory, req.gpu_count, req.gpu_name, req.gpu_memory, req.needs_container)


def ends_by_agent(running: Sequence[RunningJob]) -> dict[str, list[RunningJob]]:
    """Each agent's running jobs, soonest expected end first (unknown ends last, oldest first): built once
    per pass, so looking at one agent costs its own jobs, not every running job."""
    out: dict[str, list[RunningJob]] = {}
    for r in sorted(running, key=lambda r: (r.expected_end_ns is None, r.expected_end_ns or 0, r.started_ns)):
        out.setdefault(r.agent_id, []).append(r)
    return out


def drain(agent: AgentState, req: JobRequest, ends: Sequence[RunningJob]) -> tuple[float, int]:
    """(When `agent` is expected to have room for `req`, how many of its jobs must end first);
    inf when some of those jobs have no expected end. `ends`: the agent's jobs (`ends_by_agent`)."""
    a = AgentState(
        agent.agent_id,
        agent.name,
        agent.cpu_total,
        agent.memory_total,
        agent.gpus,
        agent.max_jobs,
        agent.containers,
        agent.used_cpu,
        agent.used_memory,
        set(agent.busy_gpus),
        agent.jobs,
    )
    if _fits(a, req) is not None:
        return (0.0, 0)
    when = 0.0
    for n, r in enumerate(ends, start=1):
        a.used_cpu -= r.cpu
        a.used_memory -= r.memory
        a.busy_gpus.difference_update(r.gpu_indices)
        a.jobs -= 1
        when = max(when, math.inf if r.expected_end_ns is None else float(r.expected_end_ns))
        if _fits(a, req) is not None:
            return (when, n)
    return (math.inf, len(ends))


def plan(
    queue: Sequence[JobRequest],
    agents: list[AgentState],
    running: Sequence[RunningJob],
    policy: Policy,
    lazy_etas: bool = False,
) -> Plan:
    """Places what may start now; `agents` is updated in place with the placements made. `lazy_etas`:
    the estimated starts are worked out when first read (WaitInfos.estimate_later), not now; the caller
    must then change neither `agents` nor `running` after."""
    p = Plan()
    if not queue:
        return p
    ordered = order(queue, policy)
    if not agents:
        for pos, req in enumerate(ordered, start=1):
            p.info[req.job_id] = WaitInfo(pos, RESOURCES, "waiting: no agent is online", 0)
            p.waiting[req.job_id] = "waiting: no agent is online"
        return p
    by_id = {a.agent_id: a for a in agents}
    on_agent = ends_by_agent(running)
    held_gpus: dict[str, int] = {}
    held_jobs: dict[str, int] = {}
    for r in running:
        held_gpus[r.owner] = held_gpus.get(r.owner, 0) + len(r.gpu_indices)
        held_jobs[r.owner] = held_jobs.get(r.owner, 0) + 1

    # A job its owner's quota holds back earns no reservation: the agent would sit idle for it.
    reserved = _reserve(
        ordered,
        agents,
        on_agent,
        policy,
        lambda r: (
            not r.gang  # a gang reserves nothing: one held agent of several would be a partial hold
            and not _over_quota(
                limits_of(policy, r.owner), held_gpus.get(r.owner, 0), held_jobs.get(r.owner, 0), r.gpu_count
            )
        ),
    )
    p.reservations = dict(reserved)
    reserved_agents = {agent: job for job, agent in reserved.items()}
    open_agents = [a for a in agents if a.agent_id not in reserved_agents]
    best_fit = _BestFit(open_agents)
    placed_before = 0  # placements the best-fit index has been told of

    never: dict[Shape, str | None] = {}
    unfit: dict[Shape, str] = {}
    reserved_fits: dict[Shape, str] = {}
    # Per shape, the reserved agents it would fit on now (why it waits). A reserved agent changes only
    # when its own job is placed there: the answers are dropped then.

    def reserved_fit(shape: Shape, req: JobRequest) -> str:
        """Why a job of `shape` waits behind reservations ("" when none of them holds an agent it fits)."""
        why = reserved_fits.get(shape)
        if why is None:
            names = [by_id[ag].name for ag in reserved_agents if _fits(by_id[ag], req) is not None]
            more = f" and {len(names) - BUSY_SHOWN:,} more" if len(names) > BUSY_SHOWN else ""
            shown = ", ".join(names[:BUSY_SHOWN]) + more
            why = reserved_fits[shape] = f"waiting: {shown} reserved for a job that waited longer" if names else ""
        return why

    waiting_users: dict[str, int] = {}  # user -> jobs of theirs already waiting, ahead in the order
    reasons: dict[str, tuple[str, str]] = {}
    limits = {u: limits_of(policy, u) for u in {r.owner for r in ordered}}
    behind: dict[str, str] = {}  # user -> why their jobs wait behind others' (one text per user)
    gangs: dict[str, list[JobRequest]] = {}
    for req in ordered:
        if req.gang:
            gangs.setdefault(req.gang, []).append(req)
    for req in ordered:
        if req.gang:
            if req.gang in gangs:  # the gang's first member in the order decides for all of them
                members = gangs.pop(req.gang)
                placed_gang = _plan_gang(req, members, agents, open_agents, p, reasons, limits, held_gpus, held_jobs)
                if not placed_gang:
                    waiting_users[req.owner] = waiting_users.get(req.owner, 0) + len(members)
            continue
        shape = shape_of(req)
        if shape not in never:
            never[shape] = never_fits(req, agents)
        if never[shape] is not None:
            p.impossible[req.job_id] = str(never[shape])
            reasons[req.job_id] = (NEVER_FITS, f"waiting: {never[shape]}")
            continue
        lim = limits[req.owner]
        gpus_now, jobs_now = held_gpus.get(req.owner, 0), held_jobs.get(req.owner, 0)
        if lim.max_gpus and req.gpu_count and gpus_now + req.gpu_count > lim.max_gpus:
            reasons[req.job_id] = (QUOTA, f"quota: {req.owner} holds {gpus_now} of at most {lim.max_gpus} GPUs")
            continue
        if lim.max_running and jobs_now + 1 > lim.max_running:
            reasons[req.job_id] = (QUOTA, f"quota: {req.owner} runs {jobs_now} of at most {lim.max_running} jobs")
            continue
        mine = reserved.get(req.job_id)
        for _, agent_id, _ in p.placements[placed_before:]:  # jobs put on agents since the last look
            best_fit.held(agent_id)
        placed_before = len(p.placements)
        if mine is not None:
            placed = best_fit.place(req, shape, p, own=by_id[mine])
        else:
            placed = shape not in unfit and best_fit.place(req, shape, p)
        if placed:
            if mine is not None:
                reserved_fits.clear()
            held_gpus[req.owner] = gpus_now + req.gpu_count
            held_jobs[req.owner] = jobs_now + 1
            p.reservations.pop(req.job_id, None)
            continue
        if mine is not None:
            _, n = drain(by_id[mine], req, on_agent.get(mine, []))
            reasons[req.job_id] = (RESERVATION, f"reserved {by_id[mine].name}, draining {_jobs(n)}")
        elif reserved_agents and (held := reserved_fit(shape, req)):
            reasons[req.job_id] = (RESERVATION, held)
        else:
            if shape not in unfit:
                unfit[shape] = f"waiting: {describe(req)} free on no agent; busy: {_busy_summary(agents)}"
            if policy.fairshare and waiting_users.keys() - {req.owner}:
                if req.owner not in behind:
                    use = policy.usage.get(req.owner, 0.0) / 3600
                    behind[req.owner] = (
                        "fair share: jobs of users with less usage (against their share) come first"
                        f" ({req.owner}: {use:.3g} GPU-hours, decayed; share {lim.share:g})"
                    )
                reasons[req.job_id] = (FAIR_SHARE, behind[req.owner])
            else:
                reasons[req.job_id] = (RESOURCES, unfit[shape])
        waiting_users[req.owner] = waiting_users.get(req.owner, 0) + 1
    p.reservations = {j: a for j, a in p.reservations.items() if j in reasons}
    reqs = {r.job_id: r for r in ordered}
    done = [(reqs[j], a, g) for j, a, g in p.placements]
    # A job held back by its owner's quota starts when one of the owner's jobs ends, at the soonest;
    # the others as agents free up, in order.
    still = [
        r for r in ordered if r.job_id in reasons and reasons[r.job_id][0] not in (NEVER_FITS, QUOTA) and not r.gang
    ]
    quota = [r for r in ordered if r.job_id in reasons and reasons[r.job_id][0] == QUOTA]
    # What the estimates are worked out from, kept as it is now: the agents and running jobs are this
    # pass's own (nothing changes them after it), the reservations and medians are copied.
    estimates = partial(
        _estimates,
        still[:ETA_LIMIT],
        quota,
        agents,
        running,
        done,
        dict(p.reservations),
        replace(policy, durations=dict(policy.durations)),
    )
    etas: Mapping[str, int] = {} if lazy_etas else estimates()
    # Straight into the info's columns (p.info is new and empty): a WaitInfo per waiting job, built and
    # taken apart again, was a tenth of a pass below FULL_QUEUE.
    positions, kinds, messages, eta_ns = p.info.columns()
    waiting, impossible = p.waiting, p.impossible
    pos = 0
    for req in ordered:
        job_id = req.job_id
        why = reasons.get(job_id)
        if why is None:
            continue
        pos += 1
        kind, message = why
        positions[job_id] = pos
        kinds[job_id] = kind
        messages[job_id] = message
        eta_ns[job_id] = etas.get(job_id, 0)
        if job_id not in impossible:
            waiting[job_id] = message
    if lazy_etas:
        p.info.estimate_later(estimates)
    return p


def _estimates(
    still: Sequence[JobRequest],
    quota: Sequence[JobRequest],
    agents: Sequence[AgentState],
    running: Sequence[RunningJob],
    placed: Sequence[tuple[JobRequest, str, list[int]]],
    reservations: Mapping[str, str],
    policy: Policy,
) -> dict[str, int]:
    """Estimated starts: `still` (in order) as agents free up (`_etas`); a job held back by its owner's
    quota when one of the owner's jobs ends, at the soonest."""
    etas = _etas(still, agents, running, placed, reservations, policy)
    owner_ends: dict[str, int] = {}
    for r in running:
        if r.expected_end_ns is not None:
            owner_ends[r.owner] = min(owner_ends.get(r.owner, r.expected_end_ns), r.expected_end_ns)
    for req in quota:
        if req.owner in owner_ends:
            etas[req.job_id] = max(owner_ends[req.owner], policy.now_ns)
    return etas


@dataclass
class Heads:
    """What a heads-only pass (`place_heads`) did."""

    placements: list[tuple[str, str, list[int]]] = field(default_factory=list)  # job, agent, GPUs
    walked: int = 0  # jobs it looked at


def place_heads(
    heads: Callable[[set[str]], Iterator[JobRequest]],
    agents: list[AgentState],
    held_gpus: dict[str, int],
    held_jobs: dict[str, int],
    policy: Policy,
    shapes: Collection[Shape],
    gang_members: Callable[[str], list[JobRequest]],
) -> Heads:
    """The placements `plan` would make, walking only the heads of the queue: the pass stops once no
    shape that waits fits on any open agent (placements only take room away, so none will later in
    the pass), skips a shape once it fits nowhere, and drops a user once their job quota is reached.
    Reasons, positions, estimates and new reservations are `plan`'s, on a slower cadence; this keeps
    last pass's reservations (`policy.reservations`: job -> agent, of jobs still waiting).

    `heads(dropped)`: the queue in `plan`'s order, lazily (`lazy_order`), skipping users in `dropped`
    (which this adds to). `agents`: the online agents with their running jobs held; `held_gpus` and
    `held_jobs`: what each user's running jobs hold (both updated with the placements made, as
    `agents` is). `shapes`: every shape in the queue. `gang_members`: a gang's waiting members."""
    h = Heads()
    if not agents:
        return h
    by_id = {a.agent_id: a for a in agents}
    reserved = {j: a for j, a in policy.reservations.items() if a in by_id}
    reserved_agents = set(reserved.values())
    # An agent with no job slot left takes nothing this pass: leaving it out keeps the pool (and each
    # shape's heap) to the agents with room, in the agents' order (best fit's tie-break).
    open_agents = [a for a in agents if a.agent_id not in reserved_agents and a.jobs < a.max_jobs]
    best_fit = _BestFit(open_agents)
    placed_before = 0
    unfit: set[Shape] = set()
    waiting_shapes = set(shapes)
    unseen_reserved = {j for j, a in reserved.items() if by_id[a].jobs < by_id[a].max_jobs}
    gangs_seen: set[str] = set()
    limits: dict[str, UserLimits] = {}
    dropped: set[str] = set()
    gang_reasons: dict[str, tuple[str, str]] = {}
    scratch = Plan()
    for req in heads(dropped):
        h.walked += 1
        unseen_reserved.discard(req.job_id)
        if req.gang:
            if req.gang not in gangs_seen and shape_of(req) not in unfit:
                gangs_seen.add(req.gang)
                members = gang_members(req.gang)
                for _, agent_id, _ in h.placements[placed_before:]:
                    best_fit.held(agent_id)
                placed_before = len(h.placements)
                lims = {req.owner: limits.get(req.owner) or limits_of(policy, req.owner)}
                before = len(scratch.placements)
                _plan_gang(req, members, agents, open_agents, scratch, gang_reasons, lims, held_gpus, held_jobs)
                for member in scratch.placements[before:]:
                    h.placements.append(member)
                    best_fit.held(member[1])
                placed_before = len(h.placements)
                if len(scratch.placements) == before and gang_fits_now(req, open_agents) == 0:
                    unfit.add(shape_of(req))  # no member of any gang of this shape fits now
                    if waiting_shapes <= unfit and not unseen_reserved:
                        break
            elif req.gang not in gangs_seen:
                gangs_seen.add(req.gang)
            continue
        shape = shape_of(req)
        mine = reserved.get(req.job_id)
        if mine is None and shape in unfit:
            continue
        lim = limits.get(req.owner)
        if lim is None:
            lim = limits[req.owner] = limits_of(policy, req.owner)
        gpus_now, jobs_now = held_gpus.get(req.owner, 0), held_jobs.get(req.owner, 0)
        if lim.max_running and jobs_now + 1 > lim.max_running:
            dropped.add(req.owner)  # none of theirs starts this pass
            continue
        if lim.max_gpus and req.gpu_count and gpus_now + req.gpu_count > lim.max_gpus:
            continue
        for _, agent_id, _ in h.placements[placed_before:]:
            best_fit.held(agent_id)
        placed_before = len(h.placements)
        placed = best_fit.place(req, shape, scratch, own=by_id[mine] if mine is not None else None)
        if placed:
            h.placements.append(scratch.placements[-1])
            held_gpus[req.owner] = gpus_now + req.gpu_count
            held_jobs[req.owner] = jobs_now + 1
            continue
        if mine is None:
            unfit.add(shape)
            if waiting_shapes <= unfit and not unseen_reserved:
                break  # nothing that waits fits anywhere now
    return h


def _plan_gang(
    first: JobRequest,
    members: list[JobRequest],
    agents: list[AgentState],
    pool: Sequence[AgentState],
    p: Plan,
    reasons: dict[str, tuple[str, str]],
    limits: Mapping[str, UserLimits],
    held_gpus: dict[str, int],
    held_jobs: dict[str, int],
) -> bool:
    """A multi-node gang, as one unit: all its members placed on distinct agents, or none of them
    (then each gets the gang's reason). Nothing is held for a gang that does not start: two gangs
    that each could take part of the agents never block each other. Gangs take no reservations and
    get no estimated start (that needs N agents draining together)."""

    def wait(kind: str, message: str) -> bool:
        for m in members:
            reasons[m.job_id] = (kind, message)
        return False

    if len(members) < first.nnodes:  # some member is not waiting (yet): nothing to place as a whole
        return wait(RESOURCES, f"waiting for {first.nnodes - len(members)} of the gang's {first.nnodes} nodes")
    why = gang_never_fits(first, agents)
    if why is not None:
        for m in members:
            p.impossible[m.job_id] = why
        return wait(NEVER_FITS, f"waiting: {why}")
    lim, owner = limits[first.owner], first.owner
    gpus_now, jobs_now, n = held_gpus.get(owner, 0), held_jobs.get(owner, 0), len(members)
    if lim.max_gpus and first.gpu_count and gpus_now + n * first.gpu_count > lim.max_gpus:
        return wait(
            QUOTA,
            f"quota: {owner} holds {gpus_now} of at most {lim.max_gpus} GPUs; the gang needs {n * first.gpu_count}",
        )
    if lim.max_running and jobs_now + n > lim.max_running:
        return wait(QUOTA, f"quota: {owner} runs {jobs_now} of at most {lim.max_running} jobs; the gang is {n}")
    placed = place_gang(members, pool)
    if placed is None:
        fit = gang_fits_now(first, pool)
        return wait(RESOURCES, f"waiting for {n} agents with {describe(first)}; {fit} fit now")
    p.placements.extend(placed)
    held_gpus[owner] = gpus_now + n * first.gpu_count
    held_jobs[owner] = jobs_now + n
    for m in members:
        p.reservations.pop(m.job_id, None)
    return True


def _over_quota(lim: UserLimits, gpus_now: int, jobs_now: int, gpus: int) -> bool:
    """Whether one more job of `gpus` GPUs would take its user over a quota."""
    return bool(lim.max_gpus and gpus and gpus_now + gpus > lim.max_gpus) or bool(
        lim.max_running and jobs_now + 1 > lim.max_running
    )


def _jobs(n: int) -> str:
    return f"{n} job" + ("" if n == 1 else "s")


class _BestFit:
    """Best fit over one pool (the open agents) for a pass, as a look at every agent would place
    (tests/unit/test_best_fit.py checks it): per job shape, a heap of the agents it fits on by what
    would be left over (then pool order, as `min` breaks ties), so a placement costs a heap operation
    or two instead of a look at every agent. An agent changes only when a job is put on it
    (`held`): it then gets a fresh entry in every shape's heap and its old ones are skipped; an agent a
    shape no longer fits leaves that heap for the pass (placements only take room away)."""

    def __init__(self, pool: Sequence[AgentState]) -> None:
        self.pool = pool
        self.index = {a.agent_id: i for i, a in enumerate(pool)}
        self.version = [0] * len(pool)
        self.heaps: dict[Shape, tuple[JobRequest, list[tuple[tuple[int, float, int], int, int]]]] = {}

    def _heap(self, shape: Shape, req: JobRequest) -> list[tuple[tuple[int, float, int], int, int]]:
        found = self.heaps.get(shape)
        if found is None:
            heap = [
                (_leftover(a, req), i, self.version[i]) for i, a in enumerate(self.pool) if _fits(a, req) is not None
            ]
            heapq.heapify(heap)
            found = self.heaps[shape] = (req, heap)
        return found[1]

    def place(self, req: JobRequest, shape: Shape, p: Plan, own: AgentState | None = None) -> bool:
        """Best fit among the pool and, for a job with a reservation, its own agent (`own`, after the pool
        in order: it wins only when strictly better)."""
        best = self._best(req, shape)
        agent, gpus = (self.pool[best[0]], best[1]) if best is not None else (None, None)
        if own is not None and (own_gpus := _fits(own, req)) is not None:
            if agent is None or (own.agent_id == req.avoid_agent, _leftover(own, req)) < (
                agent.agent_id == req.avoid_agent,
                _leftover(agent, req),
            ):
                agent, gpus = own, own_gpus
        if agent is None or gpus is None:
            return False
        agent.hold(req.cpu, req.memory, gpus)
        p.placements.append((req.job_id, agent.agent_id, gpus))
        return True

    def _best(self, req: JobRequest, shape: Shape) -> tuple[int, list[int]] | None:
        """(pool index, GPUs) of the pool's best fit for `req`, held nowhere yet; None if none fits."""
        heap = self._heap(shape, req)
        avoided: tuple[tuple[int, float, int], int, int] | None = None
        chosen: tuple[int, list[int]] | None = None
        while heap:
            _, i, v = heap[0]
            gpus = _fits(self.pool[i], req) if v == self.version[i] else None
            if gpus is None:  # an old entry, or it no longer fits
                heapq.heappop(heap)
                continue
            if self.pool[i].agent_id == req.avoid_agent and avoided is None:
                avoided = heapq.heappop(heap)  # only if nothing else fits (a new attempt's last agent)
                continue
            chosen = (i, gpus)
            break
        if avoided is not None:
            heapq.heappush(heap, avoided)
            if chosen is None:
                i = avoided[1]
                gpus = _fits(self.pool[i], req)
                assert gpus is not None
                chosen = (i, gpus)
        return chosen

    def held(self, agent_id: str) -> None:
        """A job was put on the agent (here or elsewhere in the pass): its entries are worked out again."""
        i = self.index.get(agent_id)
        if i is None:
            return
        self.version[i] += 1
        a = self.pool[i]
        for req, heap in self.heaps.values():
            if _fits(a, req) is not None:
                heapq.heappush(heap, (_leftover(a, req), i, self.version[i]))


def _reserve(
    ordered: Sequence[JobRequest],
    agents: Sequence[AgentState],
    on_agent: Mapping[str, Sequence[RunningJob]],
    policy: Policy,
    may_start: Callable[[JobRequest], bool],
) -> dict[str, str]:
    """job -> agent: last pass's reservations that still hold, then new ones for jobs that earned one."""
    online = {a.agent_id: a for a in agents}
    waiting = {r.job_id for r in ordered}
    out = {j: a for j, a in policy.reservations.items() if j in waiting and a in online}
    taken = set(out.values())
    if math.isinf(policy.reserve_after_s):
        return out
    smallest = min(_size(r) for r in ordered)
    after_ns = int(policy.reserve_after_s * NS)
    # Nothing is held here (a reservation only marks its agent taken), so per job shape the agents it
    # fits on now, and those able to run it ranked by when they drain for it, are worked out once: a
    # deep queue of starving jobs costs a look each, not a look at every agent each.
    fits_now: dict[Shape, list[AgentState]] = {}
    ranked: dict[Shape, list[AgentState]] = {}
    next_free: dict[Shape, int] = {}
    for req in ordered:
        if req.job_id in out or _size(req) <= smallest:
            continue
        if policy.waited_s is not None:
            if policy.waited_s(req.job_id) < policy.reserve_after_s:
                continue
        elif policy.now_ns - req.submitted_at < after_ns:
            continue
        if not may_start(req):
            continue
        shape = shape_of(req)
        fit = fits_now.get(shape)
        if fit is None:
            fit = fits_now[shape] = [a for a in agents if _fits(a, req) is not None]
        if any(a.agent_id not in taken for a in fit):
            continue  # it starts this pass
        order_ = ranked.get(shape)
        if order_ is None:
            able = [a for a in agents if never_fits(req, [a]) is None]
            # Stable: agents that drain equally soon keep the agents' order, as min() picked before.
            order_ = ranked[shape] = sorted(able, key=lambda a: drain(a, req, on_agent.get(a.agent_id, [])))
        i = next_free.get(shape, 0)
        while i < len(order_) and order_[i].agent_id in taken:
            i += 1
        next_free[shape] = i
        if i == len(order_):
            continue
        best = order_[i]
        out[req.job_id] = best.agent_id
        taken.add(best.agent_id)
    return out


def _etas(
    waiting: Sequence[JobRequest],
    agents: Sequence[AgentState],
    running: Sequence[RunningJob],
    placed: Sequence[tuple[JobRequest, str, list[int]]],
    reservations: Mapping[str, str],
    policy: Policy,
) -> dict[str, int]:
    """When each waiting job (in order) is expected to start: every agent's running jobs end at their
    expected ends, and each waiting job in turn takes the agent where it fits soonest from then on
    (an agent once taken is not looked at before that instant: a slight overestimate, cheaply)."""
    now = policy.now_ns
    state: dict[str, AgentState] = {}
    events: dict[str, list[_Event]] = {}
    clock: dict[str, float] = {}
    for a in agents:
        state[a.agent_id] = replace(a, busy_gpus=set(a.busy_gpus))
        events[a.agent_id] = []
        clock[a.agent_id] = float(now)
    seq = 0
    for r in running:
        if r.agent_id in events:
            end = math.inf if r.expected_end_ns is None else float(max(r.expected_end_ns, now))
            events[r.agent_id].append((end, seq, r.cpu, r.memory, r.gpu_indices))
            seq += 1
    for req, agent_id, gpus in placed:
        took = expected_s(req, policy)
        end = now + took * NS if took is not None else math.inf
        events[agent_id].append((end, seq, req.cpu, req.memory, tuple(gpus)))
        seq += 1
    for ev in events.values():
        ev.sort()
    reserved_for = {agent: job for job, agent in reservations.items()}
    # Per job shape, the agents by when that shape fits there next (version: the agent's state it was
    # worked out from). An agent's answer changes only when a job is put on it, so a long run of
    # same-shaped jobs costs a heap operation or two each, not one look per agent.
    heaps: dict[tuple[float, int, int, str, int, bool], list[tuple[float, str, int]]] = {}
    version = dict.fromkeys(state, 0)

    matching: dict[tuple[str, tuple[float, int, int, str, int, bool]], frozenset[int]] = {}

    def when(aid: str, req: JobRequest, shape: tuple[float, int, int, str, int, bool]) -> float:
        match = matching.get((aid, shape))
        if match is None:
            match = matching[(aid, shape)] = frozenset(g.index for g in state[aid].matching_gpus(req, free_only=False))
        t = _earliest(state[aid], req, events[aid], clock[aid], match)
        return math.inf if t is None else t

    out: dict[str, int] = {}
    for req in waiting[:ETA_LIMIT]:
        shape = (req.cpu, req.memory, req.gpu_count, req.gpu_name, req.gpu_memory, req.needs_container)
        heap = heaps.get(shape)
        if heap is None:
            able = [a.agent_id for a in agents if a.agent_id not in reserved_for and never_fits(req, [a]) is None]
            heap = heaps[shape] = [(when(aid, req, shape), aid, version[aid]) for aid in able]
            heapq.heapify(heap)
        while heap and heap[0][2] != version[heap[0][1]]:  # worked out before a job went there
            _, aid, _ = heapq.heappop(heap)
            heapq.heappush(heap, (when(aid, req, shape), aid, version[aid]))
        best: tuple[float, str] | None = (heap[0][0], heap[0][1]) if heap else None
        own = reservations.get(req.job_id)
        if own is not None and (t := when(own, req, shape)) < (best[0] if best else math.inf):
            best = (t, own)
        if best is None or best[0] == math.inf:
            continue
        t, aid = best
        _advance(state[aid], events[aid], t)
        clock[aid] = t
        version[aid] += 1
        fit = _fits(state[aid], req)
        if fit is None:
            continue
        state[aid].hold(req.cpu, req.memory, fit)
        took = expected_s(req, policy)
        end = t + took * NS if took is not None else math.inf
        bisect.insort(events[aid], (end, seq, req.cpu, req.memory, tuple(fit)))
        seq += 1
        out[req.job_id] = int(t)
    return out


# (expected end in ns, tie-breaker, cpu, memory, GPU indices) of a job holding an agent's resources
_Event = tuple[float, int, float, int, tuple[int, ...]]


def _earliest(
    a: AgentState, req: JobRequest, events: list[_Event], since: float, match: frozenset[int]
) -> float | None:
    """When `req` first fits on `a` as its jobs end, in order (None: never, or not before a job whose
    end nobody can guess). `match`: the agent's GPUs of the kind `req` asks for."""
    cpu, memory, jobs = a.cpu_total - a.used_cpu, a.memory_total - a.used_memory, a.max_jobs - a.jobs
    gpus = len(match - a.busy_gpus)
    if cpu >= req.cpu - 1e-9 and memory >= req.memory and jobs >= 1 and gpus >= req.gpu_count:
        return since
    for end, _, c, m, g in events:
        if end == math.inf:
            return None
        cpu, memory, jobs = cpu + c, memory + m, jobs + 1
        gpus += sum(1 for i in g if i in match)
        if cpu >= req.cpu - 1e-9 and memory >= req.memory and jobs >= 1 and gpus >= req.gpu_count:
            return max(end, since)
    return None


def _advance(a: AgentState, events: list[_Event], t: float) -> None:
    """Lets the agent's jobs that end by `t` go."""
    n = 0
    for end, _, c, m, g in events:
        if end > t:
            break
        a.used_cpu -= c
        a.used_memory -= m
        a.busy_gpus.difference_update(g)
        a.jobs -= 1
        n += 1
    del events[:n]
