"""The coordinator's decisions: scheduling passes, leases, agent reconciliation, run watchers.

Each step loads state through the store (on the DB thread), decides, then does its network I/O on
the event loop with no transaction open.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dstack.coordinator import restart_lease
from dstack.coordinator.attempts import parse_wire_job_id, wire_job_id
from dstack.coordinator.cache import secrets_digest
from dstack.coordinator.clock import SYSTEM_CLOCK, Clock, SystemClock
from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.convert import (
    artifact_input_to_proto,
    job_spec_from_bytes,
    job_updates_from_proto,
    log_acks_to_proto,
    update_acks_to_proto,
)
from dstack.coordinator.durations import Durations, duration_key
from dstack.coordinator.elapsed import NS, Instants, Waits
from dstack.coordinator.errors import InvalidRequest, SecretUnreadable, Unauthenticated
from dstack.coordinator.fairshare import decay_factor, weight
from dstack.coordinator.fencing import Quarantine, Sessions, quarantine_bound_s
from dstack.coordinator.gangs import member_env, pick_port
from dstack.coordinator.holdings import AgentHeld, Held, Holdings
from dstack.coordinator.hub import AgentConnection, AgentHub
from dstack.coordinator.leases import Leases
from dstack.coordinator.lifecycle.agents import AgentStatus
from dstack.coordinator.log_feed import RunWatchers
from dstack.coordinator.metrics import EngineMetrics
from dstack.coordinator.model import TERMINAL_JOB, WAITING, JobSpec, JobStatus, JobUpdate, LogAck, UpdateAck
from dstack.coordinator.planner import (
    DEPENDENCIES,
    Policy,
    RunningJob,
    Shape,
    UserLimits,
    WaitInfo,
    WaitInfos,
    lazy_order_of,
    place_heads,
    plan,
)
from dstack.coordinator.preemption import Preemption, Rules, choose
from dstack.coordinator.provided_jobs import AddedJobs
from dstack.coordinator.queue import Waiting, WaitingQueue, request_of
from dstack.coordinator.reports import Environments, Outcome, ReportBatcher
from dstack.coordinator.scheduler import AgentState, Gpu, JobRequest
from dstack.coordinator.secrets import SecretBox
from dstack.coordinator.store import AgentRow, Assignment, Placement, Store
from dstack.coordinator.store.cache import CacheHit
from dstack.coordinator.store.executor import DbExecutor
from dstack.coordinator.store.jobs import UpdateResult
from dstack.coordinator.store.logs import StoredChunk, batch_lines
from dstack.coordinator.store.secrets import TEAM
from dstack.coordinator.store.usage import OnAgent, OnAgentRow, on_agent_of
from dstack.protos.addresses import valid_address
from dstack.protos.refusals import agent_removed
from dstack.protos.urls import public_repo_url
from dstack.protos.v1 import agent_pb2, common_pb2

log = logging.getLogger("dstack.coordinator")
# Passes quicker than this follow each other at once (every small pool, every test); slower ones are paced.
PACE_AFTER_S = 0.02
PACE_MAX_S = 1.0
# An agent's ack held for the next pass (Engine.ack_with_pass) waits through a pause before it no longer than
# this: a longer pause sends what is held alone, first. At a drain under load a pause follows most passes, and
# sending at each one left a fifth of the acks in writes of their own (bench.drain: 1.18 writes/job, 1.00 held
# through the pauses).
HOLD_THROUGH_PAUSE_S = 0.25
# How often when agents were last heard from is written down (coordinator/leases.py): `dstack agents`
# shows the in-memory time meanwhile; a restart gives every online agent a fresh lease anyway.
HEARD_FLUSH_S = 10.0
STALL_S = 1.0  # a lease check later than this: the event loop stalled (leases are extended by the stall)
# Full passes (every waiting job's reason, position and estimated start, new reservations, unsatisfiable
# jobs failed) place jobs while the queue is this short. Over a deeper queue, heads-only passes place
# (planner.place_heads: they cost what they place, not the queue's depth), and a full pass runs beside
# them, off the DB thread (Engine._refresh_info): at most one per FULL_EVERY_S, and no more than
# FULL_SHARE of the time.
FULL_QUEUE = 1000
FULL_EVERY_S = 1.0
FULL_SHARE = 0.2
# Jobs a deep queue's full pass marks pending at most (one transaction; the rest at the next ones).
MARK_AT_ONCE = 500
# Between two complete reads of running jobs and online agents, passes update what they keep from the
# writer's journal of changed rows (coordinator/store/journal.py); a complete read every this often
# bounds what a write the journal could not see (another process on the database) would leave wrong.
REREAD_S = 10.0
# A committed requeue's read of the jobs back to waiting (`Engine._requeued`) that fails (a transient
# SQLITE_BUSY, IOERR or FULL) is tried this many times in all, the pause doubling from REQUEUE_PAUSE_S;
# after that the lease loop reads again at each of its checks until a read works (`_requeue_sweep`).
REQUEUE_TRIES = 4
REQUEUE_PAUSE_S = 0.05


@functools.lru_cache(maxsize=1 << 16)
def _address_of(advertised: str, hostname: str) -> str:
    """Where other agents reach this one, from its inventory; "" if it names none. Cached: parsing the
    addresses of 5,000 agents took a tenth of every scheduling pass."""
    return next((x for x in (advertised, hostname) if valid_address(x)), "")


MAX_WORK_DIR_SHOWN = 200  # an agent's own word, shown in every waiting job's reason: bounded


def draining_of(inv: common_pb2.Inventory) -> str:
    """Why the agent takes no new job for now ("" if it takes jobs): its disk is below its floor
    (`dstack agent --min-free-disk`, agent/diskspace.py)."""
    if not inv.disk_full:
        return ""
    where = inv.work_dir[:MAX_WORK_DIR_SHOWN] or "its work folder"
    return f"disk full, {inv.disk_free_bytes >> 20} MiB free in {where}"


# Of an agent's log batches, those that may be stored (run on the DB thread: Engine.on_message).
LogScreen = Callable[[Sequence[agent_pb2.LogBatch]], Sequence[agent_pb2.LogBatch]]
# A message of updates once handled (Engine.updates_then): its reply, its error, or None (cancelled: we stop).
UpdatesAnswer = agent_pb2.CoordinatorMessage | BaseException | None


def _answer(fut: asyncio.Future[UpdatesAnswer], agent_id: str, answer: UpdatesAnswer) -> None:
    """`on_message`'s wait for its updates, answered. Its stream may have ended meanwhile (the future cancelled
    with the task that awaited it): what followed a commit is done all the same, and an error is said here, as
    nobody else will (a write's error: nothing was committed, the agent sends it again)."""
    if fut.done():
        if isinstance(answer, BaseException):
            log.error("agent %s: its reports failed after its stream ended", agent_id, exc_info=answer)
    elif answer is None:
        fut.cancel()
    elif isinstance(answer, BaseException):  # its own error, or the batch's (its commit): no ack
        fut.set_exception(answer)
    else:
        fut.set_result(answer)


@dataclass
class Handling:
    """One agent message's handling, which may be tried again (agent_stream.Session.receive_stored, while
    the store's disk refuses writes): what an earlier try did already and must not do twice."""

    lines_counted: bool = False  # dstack_log_lines counted its lines (a try that stored them, then failed)


@dataclass
class Plan:
    assignments: list[Assignment]
    reasons: dict[str, str]  # why each job still waits
    done: list[str]  # jobs that left the queue (placed, failed, or no longer waiting)
    marked_pending: list[str]
    info: WaitInfos  # position, reason and estimated start of each waiting job
    reservations: dict[str, str]  # job -> agent held for it
    cache_hits: list[tuple[CacheHit, Waiting]] = field(default_factory=list)  # jobs the step cache completes


@dataclass
class InfoSnapshot:
    """What a deep queue's full pass (Engine._refresh_info) plans from, and what its look found."""

    # Not the whole queue's entries: that list (one reference per waiting job) would live through the
    # plan, which runs long enough for CPython's full collections to walk it (bench/memprobe.py's census).
    submitted: list[Waiting]  # the entries not yet marked pending, which this pass may mark
    queue: list[JobRequest]  # the jobs that take part (dependencies met, no step cache hit)
    agents: list[AgentState]
    running: list[RunningJob]
    policy: Policy
    reasons: dict[str, str] = field(default_factory=dict)  # jobs waiting for their dependencies
    info: WaitInfos = field(default_factory=WaitInfos)
    gone: list[str] = field(default_factory=list)  # no longer waiting
    hits: list[tuple[CacheHit, Waiting]] = field(default_factory=list)


def _held(job: OnAgent) -> Held:
    return Held(
        job.id,
        job.agent_id,
        job.owner,
        job.cpu,
        job.memory,
        tuple(job.gpu_indices),
        job.started_at,
        duration_key(job.workflow, job.job_name),
    )


def _hold_all(a: AgentState, held: AgentHeld) -> None:
    """What the agent's running jobs hold, on its pass state."""
    a.used_cpu, a.used_memory, a.busy_gpus, a.jobs = held.cpu, held.memory, set(held.gpus), held.jobs


def _request(w: Waiting) -> JobRequest:
    return w.request


def _arrival(w: Waiting) -> int:
    return w.seq


class Engine:
    def __init__(self, config: CoordinatorConfig, store: Store, db: DbExecutor, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        store.usage.half_life_s = config.fairshare_half_life_s
        store.logs.max_bytes = config.max_log_bytes
        # Leases are read and paced by this clock; the store should stamp rows with the same one.
        self.clock = clock
        self.store = store
        self.db = db
        self.hub = AgentHub()
        self.sessions = Sessions()  # each agent stream's epoch (coordinator/fencing.py)
        # Durations on the monotonic clock (coordinator/elapsed.py): since when each job waits, runs
        # (job -> its attempt's started_at and instant), and each agent has not been heard from.
        self.waits = Waits(clock)
        self.started = Instants(clock)
        self.unheard = Instants(clock)
        self.quarantine = Quarantine()  # agents that may still run attempts that are over
        self.watchers = RunWatchers(config.log_follow_buffer_bytes)
        self._kick = asyncio.Event()
        # The scheduler's loop runs; the passes it has begun; one is under way; it pauses long before its next
        # pass (ack_with_pass).
        self._scheduling = False
        self._passes_begun = 0
        self._in_pass = False
        self._pacing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._job_runs: dict[str, str] = {}  # job_id -> run_id, for routing log notifications
        self.reports = ReportBatcher(store, db)
        # Agents' leases, in memory: renewed as each message is read, never behind the DB thread
        # (coordinator/leases.py); when each was last heard from is written in batches.
        self.leases = Leases()
        # On the real clock only: a lease check that comes late means the event loop did not run (a stall of
        # the coordinator's own: a long synchronous step, the process descheduled on a saturated host).
        # Agents' messages waited unread meanwhile; leases are extended by the stall (see _lease_loop).
        # A manual clock (tests) jumps by design: its jumps are not stalls.
        self.guard_stalls = isinstance(clock, SystemClock)
        # The lease this start gives every online agent (coordinator/restart_lease.py), and the one every later
        # start is sure to give (kept in the state folder): hello acks promise no more than that (none before).
        self.restart_lease_s: float | None = None
        self._kept_restart_lease_s = 0.0
        # A lease check the store could not write (its disk full): the next lease check renews every
        # online agent's lease before it expires any.
        self._renewal_failed = False
        self._inventories: dict[str, tuple[bytes, common_pb2.Inventory]] = {}
        self._disk_full: set[str] = set()  # agents whose last inventory said their disk is full (draining)
        # Why each waiting job waits, from the last scheduling pass (shown by `dstack ps`).
        self.pending_reasons: dict[str, str] = {}
        # Position, reason and estimated start of each waiting job, from the last pass (docs/state.md).
        self.wait_info = WaitInfos()
        # Agents held for jobs that waited too long (job -> agent), kept from pass to pass.
        self.reservations: dict[str, str] = {}
        # Agents held for jobs that preempted jobs there (job -> agent), until the job leaves the queue:
        # merged into the planner's reservations, so nothing else takes the room the preemption frees.
        self.preempted_for: dict[str, str] = {}
        # Users' decayed usage as of the last pass (running jobs' so far included), for preemption.
        self.last_usage: dict[str, float] = {}
        self.durations = Durations()
        self._max_durations: dict[str, float] = {}  # job_id -> its own limit, for jobs that have one
        self._idle = asyncio.Event()  # no pass asked for or running
        # Whether a job may have finished since usage was last charged (a submission alone cannot).
        self._charge_due = True
        self._limits: dict[str, UserLimits] | None = None  # users' shares and quotas, until one changes
        self.metrics = EngineMetrics()  # scraped at /metrics (coordinator/http/metrics.py)
        self.assignments_sent = 0  # over the engine's life (the fairness bench counts deliveries by it)
        self.queue = WaitingQueue()
        # Between full passes (FULL_QUEUE): what running jobs hold (coordinator/holdings.py), read again
        # when a job may have ended; the online agents' rows, read again when the connected set changes.
        self.holdings = Holdings()
        # Placed jobs whose assignment could not be built or sent, to be failed in the store (job id, attempt,
        # agent id, why): `_fail_undelivered`.
        self._undelivered: list[tuple[str, int, str, str]] = []
        self._holdings_read = False
        self._agent_rows: list[AgentRow] | None = None
        self._agent_row_keys: list[tuple[str, str, bytes | None]] = []  # what `_agent_rows` was read with
        self._held_of_row: dict[OnAgentRow, Held] = {}  # the last reread's records, by the row each came from
        self._agent_rows_for: frozenset[str] = frozenset()
        # Per agent, its capacities as parsed from the inventory bytes of its row (the same bytes object
        # while the rows are kept between passes): the DB thread's only.
        self._capacities: dict[str, tuple[bytes, AgentState]] = {}
        # The agents' states as heads-only passes see them, kept from pass to pass (`_heads_agent_states`):
        # for whom (the connected set), from which rows, and the agents the last heads pass placed on.
        self._kept_states: dict[str, AgentState] | None = None
        self._kept_for: frozenset[str] = frozenset()
        self._kept_rows: dict[str, AgentRow] = {}
        self._kept_from_rows: list[AgentRow] | None = None
        self._placed_on: set[str] = set()
        self._info: asyncio.Task[None] | None = None  # `_refresh_info`, while it runs
        self._info_wanted = True  # something happened since the last one began
        self._heads_took = 0.0  # the last heads-only pass's time on the DB thread
        # Statuses within runs with dependants, as heads-only passes read them (per run), until a job of
        # the run changes (coordinator/store/journal.py): the DB thread's only.
        self._dependency_statuses: dict[str, dict[tuple[str, str], JobStatus]] = {}
        self._reread_at = 0.0  # perf_counter: passes read every running job and agent again then (REREAD_S)
        self._pass_took = 0.0  # the last pass's time on the DB thread (either kind)
        self._pass_cpu = 0.0  # and its CPU time there
        self._info_timer: asyncio.TimerHandle | None = None
        # FULL_QUEUE, FULL_EVERY_S, FULL_SHARE, as this engine uses them (tests take the deep queue's
        # path with a short one).
        self.full_queue = FULL_QUEUE
        self.full_every_s = FULL_EVERY_S
        self.full_share = FULL_SHARE
        self._next_full = 0.0  # perf_counter: a deep queue's next full pass is due then
        self.secret_box = SecretBox(config.secrets_key_path)
        # Decrypted, for the job hand-off only: owner ('' for the team's) -> name -> value.
        self.secrets: dict[str, dict[str, str]] = {}
        # owner -> secrets_digest(owner), computed per submission otherwise; dropped whenever a secret changes.
        self._secrets_digests: dict[str, str] = {}
        # The step cache (coordinator/cache.py): puts a hit's files under the job's own name in the object
        # store (server.py sets it; without it no job is looked up).
        self.copy_cached: Callable[[CacheHit], Awaitable[None]] | None = None
        self._reusing: set[asyncio.Task[None]] = set()
        # What follows from agents' committed reports when it must wait for the store (a requeue, a gang to
        # settle): the engine's own, run to its end whether or not the reporting stream still is (`_report`).
        self._following: set[asyncio.Task[None]] = set()
        # Committed requeues owed a read of every waiting job (their read back failed, or an error came before
        # it) and, of those, how many such a read made after them has paid: while the second is behind, jobs
        # back to waiting may be missing from the queue, and the lease loop reads them all (`_requeue_sweep`).
        self._requeues_due = 0
        self._requeues_read = 0
        self._requeue_failing = False  # its failure was logged (once, until a read works again)

    # ---- lifecycle ---------------------------------------------------------------------------
    def own_restart_lease_s(self) -> float:
        """The lease this coordinator's options give agents at its start: lease + requeue margin + grace."""
        return self.config.lease_timeout_s + self.requeue_margin_s() + self.config.reconnect_grace_s

    async def keep_restart_lease(self) -> float:
        """Makes this coordinator's restart lease durable before any hello ack can publish its grace, and
        learns the largest one ever published on this state, which its start gives (coordinator/restart_lease.py).
        server.py calls it before it listens; `start` otherwise."""
        if self.restart_lease_s is None:
            own = self.own_restart_lease_s()
            try:
                kept = await asyncio.to_thread(restart_lease.honour, self.config.state_dir, own)
            except OSError as e:  # a full or read-only state folder: start anyway, promising only what is kept
                kept = await asyncio.to_thread(restart_lease.kept, self.config.state_dir)
                log.warning(
                    "cannot write %s (%s): hello acks promise agents only what the %.1f s kept there covers",
                    self.config.state_dir / restart_lease.FILE,
                    e.strerror or e,
                    kept,
                )
            self._kept_restart_lease_s = kept
            self.restart_lease_s = max(own, kept)
            if kept > own:
                log.info(
                    "a coordinator before this one promised agents %.1fs after a restart (more than this one's"
                    " --lease-timeout + --fence-margin + --reconnect-grace, %.1fs): this start gives that",
                    self.restart_lease_s,
                    own,
                )
        return self.restart_lease_s

    async def start(self) -> None:
        # Agents could not renew their leases while we were down, and each notices we are back only at
        # its next reconnect attempt: a lease counted from now alone would let a restart make healthy
        # agents "lost" (and fail their jobs) whenever that attempt comes later than the lease timeout.
        # And an agent refused by our port while we were down counts on the restart lease a coordinator
        # before us published (coordinator/restart_lease.py): no start gives less.
        restart_s = await self.keep_restart_lease()
        await self.db(self.store.extend_all_leases, self.lease_now() + int(restart_s * 1e9))
        for agent_id in await self.db(self.store.online_agent_ids):
            self.leases.grant(agent_id, self.clock.monotonic() + restart_s)
        self.secrets = {}
        self._secrets_digests.clear()
        for owner, name, ciphertext in await self.db(self.store.secret_ciphertexts):
            try:
                self.secrets.setdefault(owner, {})[name] = self.secret_box.decrypt(ciphertext)
            except InvalidRequest:
                whose = f"{owner}'s secret" if owner else "team secret"
                raise SecretUnreadable(
                    f"the {whose} {name!r} in the database {self.config.db_path} cannot be decrypted with the key"
                    f" {self.config.secrets_key_path}: that key file is not the one the database was written with,"
                    " or the row is damaged; put back the key file of this database, or restore both from a backup"
                ) from None
        rows = await self.db(self.store.waiting_jobs)
        for row in rows:
            self.queue.add_row(row)
        self.waits.load((row.id, row.submitted_at) for row in rows)
        recent = await self.db(self.store.recent_durations)
        self.durations.add((duration_key(f.workflow, f.job_name), f.seconds) for f in reversed(recent))
        self._tasks = [
            asyncio.create_task(self._scheduler_loop(), name="scheduler"),
            asyncio.create_task(self._lease_loop(), name="leases"),
            asyncio.create_task(self._refresh_loop(), name="queue refresh"),
        ]
        self.kick()

    async def stop(self) -> None:
        if self._info_timer is not None:
            self._info_timer.cancel()
        # Reports' follow-ups too: what they would do is in the store already, and read back at the next start
        # (jobs back to waiting join the queue in `start`; the lease loop's gang sweep settles gangs).
        tasks = self._tasks + ([self._info] if self._info is not None else []) + list(self._following)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.hub.close_all()

    def kick(self, finished: bool = True) -> None:
        """Asks for a scheduling pass; many kicks before a pass cost one pass. `finished`: whether a job
        may have ended meanwhile (its usage is then charged in the pass; a new submission says no)."""
        self._charge_due = self._charge_due or finished
        self._info_wanted = True
        self._kick.set()
        self._idle.clear()

    def _info_due(self) -> None:
        """A deep queue's full pass is due (`_refresh_info`) and was asked for meanwhile."""
        self._info_timer = None
        self._kick.set()
        self._idle.clear()

    def limits_changed(self) -> None:
        """A user's share or quotas changed: the next pass reads them again."""
        self._limits = None
        self.kick(finished=False)

    def lease_until(self, grace_s: float = 0.0) -> int:
        """When a lease given now runs out, in nanoseconds of the monotonic clock (`lease_now`): a step
        of the wall clock (NTP, an admin's `date -s`) must not make every healthy agent lost at once."""
        return self.lease_now() + int((self.config.lease_timeout_s + self.requeue_margin_s() + grace_s) * 1e9)

    def requeue_margin_s(self) -> float:
        """How long after an agent's own lease deadline its jobs may be requeued: with self-fencing, the
        time it has to kill them (docs/lifecycle.md, "Self-fencing"); without, none."""
        return self.config.fence_margin_s if self.config.self_fence != "off" else 0.0

    def fence_policy(self) -> tuple[int, bool]:
        """What the hello ack tells each agent: (self_fence_after_ms, strict); 0 ms: never fence. The agent
        counts from its send of the last acknowledged renewal, we from the receipt of its last message:
        it stops its jobs `fence_kill_s` before we may requeue them, and never before the lease itself."""
        if self.config.self_fence == "off":
            return 0, False
        after = self.config.lease_timeout_s + max(0.0, self.config.fence_margin_s - self.config.fence_kill_s)
        return int(after * 1000), self.config.self_fence == "strict"

    def published_grace_ms(self) -> int:
        """What the hello ack promises after a refused connection, beyond self_fence_after (agent/lease.py):
        the reconnect grace, once the restart lease that covers it is kept (coordinator/restart_lease.py);
        nothing with fencing off or strict (refusals do not count), or before it is kept."""
        if self.config.self_fence != "on":
            return 0
        # An agent refused at t keeps its jobs until t + self_fence_after + this, and a later start at s > t
        # gives it until s + restart lease: the same distance, lease + margin - self_fence_after = min(kill
        # time, margin), separates the two as separates any agent's deadline from its requeue (fence_policy).
        grace_s = self._kept_restart_lease_s - self.config.lease_timeout_s - self.requeue_margin_s()
        return max(0, int(grace_s * 1000))

    def _lease_deadline(self, grace_s: float = 0.0) -> float:
        """`lease_until` in seconds of the monotonic clock, as the in-memory leases keep it (the requeue
        margin included: a self-fencing agent stops its jobs before we may requeue them)."""
        return self.clock.monotonic() + self.config.lease_timeout_s + self.requeue_margin_s() + grace_s

    def heard(self, agent_id: str) -> None:
        """A message from the agent was read off its stream (its current session's): proof of life, on the
        event loop, before the message waits for anything (coordinator/leases.py)."""
        now = self.clock.monotonic()
        until = now + self.config.lease_timeout_s + self.requeue_margin_s()
        self.leases.renew(agent_id, now, until, self.store.clock())

    def agent_online(self, agent_id: str) -> None:
        """The agent is online (its hello, or an admin's approval while it is connected): it holds a lease,
        and was heard from now (its silence is counted from here, not from before a reconnect)."""
        self.leases.grant(agent_id, self._lease_deadline(), heard_at=self.clock.monotonic())

    def stream_unread(self, agent_id: str) -> None:
        """We stopped reading the agent's (current) stream: its inbox is full, behind the database. What it
        sends meanwhile, heartbeats too, waits in the transport: its lease does not run out (leases.hold)."""
        self.leases.hold(agent_id)

    def stream_read_again(self, agent_id: str) -> None:
        """The agent's stream is read again: its lease starts afresh from now."""
        self.leases.release(agent_id, self.clock.monotonic(), self._lease_deadline())

    def lease_now(self) -> int:
        # Monotonic time means nothing across a restart; start() gives every online agent a fresh lease.
        return int(self.clock.monotonic() * 1e9)

    # ---- scheduling --------------------------------------------------------------------------
    def ack_with_pass(self, conn: AgentConnection, reply: agent_pb2.CoordinatorMessage) -> bool:
        """Holds `reply` (acknowledgements of updates that ended jobs: their capacity is free, a pass is asked
        for) to leave with the agent's next message, most often that pass's assignment to it: one write on its
        stream for both, not two (each write is a wake-up of the stream's writer and a completion on the event
        loop). Only while a pass is asked for or under way, and not during a long pause between passes: the ack
        leaves at the latest once the pass under way has ended, when none is asked for, or else once the next
        one has, after a pause of at most HOLD_THROUGH_PAUSE_S between them (`_schedule`, `_pause`). It still
        follows its commit; a stream that ends meanwhile drops it, and the agent sends its update again. False:
        not held, send it now."""
        if not self._scheduling or self._pacing or not (self._kick.is_set() or self._in_pass):
            return False
        self.hub.hold(conn, reply, self._passes_begun)
        return True

    async def _scheduler_loop(self) -> None:
        self._scheduling = True
        try:
            await self._schedule()
        finally:
            self._scheduling = False
            self.hub.release_held()

    async def _schedule(self) -> None:
        while True:
            if not self._kick.is_set():
                self.hub.release_held()  # no pass is coming to carry them
                self._idle.set()
            await self._kick.wait()
            self._kick.clear()
            self._passes_begun += 1
            if not len(self.queue):
                # No pass: the acks held before it are not waiting for one.
                self.hub.release_held(begun_before=self._passes_begun)
                continue
            self._in_pass = True
            charge, self._charge_due = self._charge_due, False
            began = time.perf_counter()
            full = len(self.queue) <= self.full_queue
            if not full and self._info is None and self._info_wanted:
                # Over a deep queue, reasons, positions, estimates and new reservations are worked out
                # beside the passes that place (planner.place_heads), not in one of them, on a cadence.
                if began >= self._next_full or self._limits is None:
                    self._info_wanted = False
                    self._info = asyncio.create_task(self._refresh_info(), name="wait info")
                elif self._info_timer is None:
                    self._info_timer = asyncio.get_running_loop().call_later(self._next_full - began, self._info_due)
            connected = self.hub.connected_ids()
            try:
                if full:
                    plan = await self.db(self._timed_plan, self.queue.snapshot(), connected, charge)
                else:
                    by_user, shapes = self.queue.by_user(), self.queue.shapes()
                    plan = await self.db(self._timed_heads, by_user, shapes, connected, charge)
            except Exception:
                log.exception("scheduling pass failed")
                self.metrics.scheduling_failures.inc()
                self._holdings_read = False  # read again: the pass may have failed after placing
                self._in_pass = False
                await self._pause(0.5)
                self.kick(finished=charge)
                continue
            try:
                if full:
                    self.pending_reasons = plan.reasons  # replaced whole: jobs placed or gone drop out
                    self.wait_info = plan.info
                    self.reservations = plan.reservations
                elif plan.done and self.reservations:
                    # Reasons and positions wait for the next full pass (a listing shows a job's only while
                    # it waits); a reservation lets go at once. Replaced, not changed: listings read it.
                    self.reservations = {j: a for j, a in self.reservations.items() if j not in set(plan.done)}
                self.queue.discard(plan.done)
                self.waits.discard(plan.done)
                self.queue.mark_pending(plan.marked_pending)
                for hit, w in plan.cache_hits:
                    task = asyncio.create_task(self._reuse(hit, w), name=f"reuse {hit.run_name}/{hit.job_name}")
                    self._reusing.add(task)
                    task.add_done_callback(self._reusing.discard)
            except Exception:
                # Nothing here is in the store: what it missed, a later pass finds again (a job the pass
                # placed and left in the queue is no longer waiting: placing it again moves no row).
                log.exception("applying a scheduling pass failed")
                self.metrics.scheduling_failures.inc()
            sent, sent_cpu = time.perf_counter(), time.thread_time()
            try:
                self._deliver(plan.assignments)  # with what their agents' streams hold (`ack_with_pass`)
            finally:
                # The acks held before this pass began are not for a later one (those held since wait for the next).
                self.hub.release_held(begun_before=self._passes_begun)
                self._in_pass = False
            # The pass itself: its time on the DB thread (placing and writing; not its wait there) and
            # the assignments' messages built and queued here; and the CPU time of both.
            self.metrics.scheduling_pass.observe(self._pass_took + time.perf_counter() - sent)
            self.metrics.scheduling_pass_cpu.observe(self._pass_cpu + time.thread_time() - sent_cpu)
            # A pass over a deep queue holds the DB thread (submissions, heartbeats, updates wait behind
            # it): the next one waits as long as this one took, so passes take at most about half of it,
            # and what finished meanwhile is placed by one pass rather than by many back to back. A
            # heads-only pass counts its own time on the DB thread, not its wait there behind a deep
            # queue's full pass (that wait is no cost of its own to pace).
            took = time.perf_counter() - began if full else self._heads_took
            if self._undelivered:
                await self._fail_undelivered()
            if took > PACE_AFTER_S:
                await self._pause(min(took, PACE_MAX_S))

    async def _pause(self, seconds: float) -> None:
        """The scheduler waits before its next pass: what is held for it (`ack_with_pass`) waits through a short
        pause, and is sent alone before a longer one, which holds nothing."""
        if seconds <= HOLD_THROUGH_PAUSE_S:
            await asyncio.sleep(seconds)
            return
        self.hub.release_held()
        self._pacing = True
        try:
            await asyncio.sleep(seconds)
        finally:
            self._pacing = False

    async def _refresh_info(self) -> None:
        """Every waiting job's reason, position and estimated start, new reservations, unsatisfiable jobs
        failed and new ones marked pending, over a deep queue: the planner's full pass (`plan`) on a
        snapshot, off the DB thread (only the snapshot and the writes are on it), while heads-only passes
        go on placing. Its own placements are not applied: the next heads-only pass makes them (with the
        reservations it made). At most one at a time, at most one per FULL_EVERY_S and no more than
        FULL_SHARE of the time."""
        began = time.perf_counter()
        try:
            snap = await self.db(self._info_snapshot, self.queue.snapshot(), self.hub.connected_ids())
            decision = await asyncio.to_thread(plan, snap.queue, snap.agents, snap.running, snap.policy)
            reasons, info = snap.reasons, snap.info
            reasons.update(decision.waiting)
            info.merge(decision.info)
            failures = []
            for job_id, why in decision.impossible.items():
                if self.config.fail_unsatisfiable:
                    failures.append((job_id, why))
                    info.discard(job_id)
                else:
                    reasons[job_id] = f"waiting: {why}"
            to_mark = [w.job_id for w in snap.submitted if w.submitted and w.job_id in reasons][:MARK_AT_ONCE]
            await self.db(self._apply_info, to_mark, failures, reasons)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("working out why jobs wait failed")
            self._next_full = time.perf_counter() + self.full_every_s
            return
        finally:
            self._info = None
        took = time.perf_counter() - began
        self.metrics.full_pass.observe(took)
        self._next_full = time.perf_counter() + max(self.full_every_s, took / self.full_share)
        self.pending_reasons = reasons  # replaced whole: jobs placed or gone since drop out at the next
        self.wait_info = info
        self.reservations = {j: a for j, a in decision.reservations.items() if j in self.queue}
        done = snap.gone + [f[0] for f in failures]
        self.queue.discard(done)
        self.waits.discard(done)
        self.queue.mark_pending(to_mark)
        for hit, w in snap.hits:
            task = asyncio.create_task(self._reuse(hit, w), name=f"reuse {hit.run_name}/{hit.job_name}")
            self._reusing.add(task)
            task.add_done_callback(self._reusing.discard)
        if failures or snap.gone:
            self.watchers.notify_all()
        # New reservations: a heads-only pass places by them (not a kick: that would ask for this again).
        self._kick.set()
        self._idle.clear()

    def _info_snapshot(self, waiting: list[Waiting], connected: set[str]) -> InfoSnapshot:
        """What `_refresh_info` plans from (DB thread)."""
        now, agents, running, usage = self._state(connected, charge=False, full=True)
        statuses = self.store.dependency_statuses(sorted({w.run_id for w in waiting if w.depends_on}))
        submitted = [w for w in waiting if w.submitted]
        snap = InfoSnapshot(submitted, [], list(agents.values()), running, self._policy(now, usage))
        for w in waiting:
            # No step cache lookup here: a heads-only pass could place the job before this one's
            # results arrive, and the hit would complete it as well.
            why = self._admit(w, statuses, snap.gone, snap.hits, cache=False)
            if why:
                snap.reasons[w.job_id] = why
                snap.info[w.job_id] = WaitInfo(0, DEPENDENCIES, why, 0)
            elif why is None:
                if w.request.max_duration_s:
                    self._max_durations[w.job_id] = w.request.max_duration_s
                snap.queue.append(w.request)
        return snap

    def _apply_info(self, to_mark: list[str], failures: list[tuple[str, str]], reasons: dict[str, str]) -> None:
        """The writes of `_refresh_info` (DB thread): one transaction."""
        self.store.apply_schedule([], to_mark, failures)
        holds, queue = self.holdings.jobs, self.queue
        self._max_durations = {j: s for j, s in self._max_durations.items() if j in holds or j in reasons or j in queue}

    async def _reuse(self, hit: CacheHit, w: Waiting) -> None:
        """A step cache hit: the source's files under the job's own name, then the job is done. Files that
        are gone (deleted behind the coordinator's back) make the source useless: it is forgotten and the
        job goes back to the queue to run."""
        assert self.copy_cached is not None
        try:
            await self.copy_cached(hit)
            completed = await self.db(self.store.cache.complete_hit, hit)
        except Exception as e:
            log.warning(
                "step cache: %s/%s cannot reuse %s/%s (%s); it runs",
                hit.run_name,
                hit.job_name,
                hit.source_run,
                hit.source_job,
                e,
            )
            # Back in the queue first: its row still waits, and a failure to forget the source (the store's
            # disk) must not leave it out (before, it did, until a restart).
            self.queue.add_waiting(w)
            self.kick(finished=False)
            try:
                await self.db(self.store.cache.forget, hit.source_job_id)
            except Exception:
                log.exception(
                    "step cache: forgetting %s/%s failed; a later hit may try it again", hit.source_run, hit.source_job
                )
            return
        if completed:
            log.info("step cache: %s/%s reused %s/%s", hit.run_name, hit.job_name, hit.source_run, hit.source_job)
        self.watchers.notify([hit.run_id])
        self.kick()  # its dependants may start

    async def settled(self) -> None:
        """Returns once no scheduling pass is asked for or running, nor a deep queue's full pass
        (in-process tests and the fairness bench step a manual clock by it)."""
        while True:
            await self._idle.wait()
            info = self._info
            if info is None and self._idle.is_set():
                return
            if info is not None:
                await asyncio.wait([info])

    async def _refresh_loop(self) -> None:
        """A pass now and then while jobs wait, though nothing happened: waits pass the reservation
        threshold, and positions and estimates age."""
        every = max(1.0, min(10.0, self.config.reserve_after_s / 4))  # 10 s when reservations are off (inf)
        while True:
            await self.clock.sleep(every)
            if len(self.queue):
                self.kick()

    def _deliver(self, assignments: Sequence[Assignment]) -> None:
        """`_send_assignments`, which must not end the scheduler: the pass's jobs are ASSIGNED in the store
        already, and one that is never sent would stay so while its agent stays connected (only a hello
        sends an agent's ASSIGNED jobs again). A failure of the whole (not of one job's message: those are
        `_send_assignments`' own) is tried once more at once, in this turn of the event loop, before any of
        it is written to an agent's stream: an agent drops an assignment whose id it has already. Failed
        twice: every job of the pass fails (`_fail_undelivered`) and is aborted on its agent, for an agent
        may have been sent it."""
        try:
            self._send_assignments(assignments)
            return
        except Exception:
            log.exception("sending a pass's %d assignments failed; sending them again", len(assignments))
            self.metrics.scheduling_failures.inc()
        try:
            self._send_assignments(assignments)
            return
        except Exception as e:
            log.exception("sending a pass's %d assignments failed again; their jobs fail", len(assignments))
            why = f"its assignment could not be sent to its agent ({type(e).__name__}: {e})"
        for a in assignments:
            self._undelivered.append((a.job_id, a.attempt, a.agent_id, why))
            stop = agent_pb2.StopJob(job_id=wire_job_id(a.job_id, a.attempt), abort=True)
            self.hub.send(a.agent_id, agent_pb2.CoordinatorMessage(stops=[stop]))

    def _send_assignments(self, assignments: Sequence[Assignment]) -> None:
        """One message per agent for all it got in a pass (a pass places thousands at scale). A job whose
        message cannot be built (its spec or code in the store is unreadable) is left out, and owed to
        `_fail_undelivered`: the others are sent, in the pass's order."""
        by_agent: dict[str, list[agent_pb2.JobAssignment]] = {}
        built = 0
        for a in assignments:
            try:  # inline, not `_assignment_or_none`: a pass builds thousands
                msg = self._assignment(a)
            except Exception as e:
                self._unbuilt(a, e)
                continue
            by_agent.setdefault(a.agent_id, []).append(msg)
            built += 1
        for agent_id, theirs in by_agent.items():
            self.hub.send(agent_id, agent_pb2.CoordinatorMessage(assignments=theirs))
        self.assignments_sent += built

    def _assignment_or_none(self, a: Assignment) -> agent_pb2.JobAssignment | None:
        """`_assignment`, or None where it cannot be built (`_unbuilt`)."""
        try:
            return self._assignment(a)
        except Exception as e:
            self._unbuilt(a, e)
            return None

    def _unbuilt(self, a: Assignment, e: Exception) -> None:
        """A placed job whose assignment could not be built is owed to `_fail_undelivered`: a corrupt blob in
        the store fails as often as it is tried, and trying again would place it, fail and free its agent at
        every pass while the job never runs and nobody is told."""
        why = _unbuildable(a, e)
        log.error("job %s/%s (%s): %s; it fails", a.run_name, a.job_id, wire_job_id(a.job_id, a.attempt), why)
        self.metrics.scheduling_failures.inc()
        self._undelivered.append((a.job_id, a.attempt, a.agent_id, why))

    async def _fail_undelivered(self) -> None:
        """Fails the placed jobs that could not be sent (`_undelivered`) in the store: their agents' capacity
        is free again at the next pass (the store's journal sees the change), their runs' statuses follow.
        A failure of the store keeps them owed, tried after the next pass or at the next lease check."""
        owed, self._undelivered = list(dict.fromkeys(self._undelivered)), []  # a send tried twice lists one twice
        try:
            runs = await self.db(self.store.fail_undelivered, owed)
        except Exception:
            log.exception("failing %d jobs whose assignments could not be sent failed; tried again later", len(owed))
            self._undelivered = owed + self._undelivered
            return
        if runs:
            self.watchers.notify(runs)
        self.kick()  # the capacity they held is free

    def _timed_plan(self, waiting: list[Waiting], connected: set[str], charge: bool) -> Plan:
        # Timed on the DB thread: the pass itself, not its wait behind other store calls.
        began, began_cpu = time.perf_counter(), time.thread_time()
        with self.metrics.full_pass.time():
            try:
                return self._plan(waiting, connected, charge)
            finally:
                self._pass_took = time.perf_counter() - began
                self._pass_cpu = time.thread_time() - began_cpu

    def _timed_heads(
        self, by_user: dict[str, Sequence[Waiting]], shapes: set[Shape], connected: set[str], charge: bool
    ) -> Plan:
        began, began_cpu = time.perf_counter(), time.thread_time()
        try:
            return self._heads(by_user, shapes, connected, charge)
        finally:
            self._heads_took = self._pass_took = time.perf_counter() - began
            self._pass_cpu = time.thread_time() - began_cpu

    def _state(
        self, connected: set[str], charge: bool, full: bool
    ) -> tuple[int, dict[str, AgentState], list[RunningJob], dict[str, float]]:
        """What a pass starts from (DB thread): now, the connected agents with what their running jobs
        hold, those jobs, and users' decayed usage (running jobs' so far included). `charge`: a job may
        have ended since the last pass (its usage is charged, and running jobs are read again)."""
        store = self.store
        now = self.clock.time_ns()
        half_life = self.config.fairshare_half_life_s
        if charge:
            finished = store.charge_finished_usage(now, half_life)
            self.durations.add((duration_key(f.workflow, f.job_name), f.seconds) for f in finished if f.done)
        usage = {u: acc.at(now, half_life) for u, acc in store.usage_accumulators().items()}
        reread = not self._holdings_read or time.perf_counter() >= self._reread_at
        changes = None if reread else store.journal.drain()
        if changes is None:
            # Everything read again (the first pass; after a failed one; a journal that was lost; and every
            # REREAD_S, which bounds the harm of a write the journal could not see), and the journal
            # (coordinator/store/journal.py) counts from here.
            store.journal.start()
            on_agents = store.jobs_on_agent_rows()
            self.started.keep((r[0], r[8]) for r in on_agents if r[8] is not None)
            # Applied as a difference (Holdings.sync), with a record made only of a row that differs from
            # last time's: a reread that finds what is kept costs its query and comparisons, not a record
            # per job and a rebuild of every sum and agent state (the 10 s spike at 5,000 agents).
            self.holdings.sync(self._held_of_rows(on_agents))
            self._dependency_statuses = {}
            self._holdings_read = True
            self._reread_at = time.perf_counter() + REREAD_S
        else:
            # Only the jobs that changed since the last pass: what ended leaves, what started or moved
            # is read again; no reread of every running job because one of them ended.
            for job_id in changes.off_agents:
                self.holdings.remove(job_id)
            for changed in changes.on_agents:
                self.holdings.add(_held(changed))
            for run_id in changes.runs:
                self._dependency_statuses.pop(run_id, None)
        reread_agents = changes is None or changes.agents
        if full:
            agents = self._idle_agent_states(connected, reread=reread_agents)
            for agent_id, held in self.holdings.agents.items():
                if (a := agents.get(agent_id)) is not None:
                    _hold_all(a, held)
        else:
            agents = self._heads_agent_states(connected, reread=reread_agents)
        running: list[RunningJob] = []
        # A heads-only pass reads only the usage so far of the jobs that run (every running job's, a
        # loop of 5,000 at full size: kept to arithmetic, one lock and one clock read for all of them);
        # a full pass also the jobs themselves, with when each started and is expected to end.
        started = [j for j in self.holdings.jobs.values() if j.started_at is not None and (full or j.started_at)]
        ran_ns = self._ran_ns_all(started)
        tau = half_life / math.log(2)
        for job, ran in zip(started, ran_ns, strict=True):
            # interval_usage(cost, now - ran, now, now, half_life), the same arithmetic inlined
            so_far = (
                weight(len(job.gpu_indices), job.cpu) * tau * (1.0 - decay_factor(ran / NS, half_life))
                if ran > 0
                else 0.0
            )
            usage[job.owner] = usage.get(job.owner, 0.0) + so_far
        if not full:
            return now, agents, running, usage
        ran_of = {j.job_id: r for j, r in zip(started, ran_ns, strict=True)}
        for job in self.holdings.jobs.values():
            # When it started, as `now` minus how long it has run on the monotonic clock: a step of
            # the wall clock changes neither its usage so far nor its expected end.
            start = now if job.started_at is None else now - ran_of[job.job_id]
            took = self._max_durations.get(job.job_id) or self.durations.medians.get(job.duration_key)
            running.append(
                RunningJob(
                    job.job_id,
                    job.agent_id,
                    job.owner,
                    job.cpu,
                    job.memory,
                    job.gpu_indices,
                    start,
                    None if took is None else start + int(took * 1e9),
                )
            )
        return now, agents, running, usage

    def _policy(self, now: int, usage: dict[str, float]) -> Policy:
        cfg = self.config
        self.last_usage = usage
        return Policy(
            now_ns=now,
            fairshare=cfg.fairshare,
            usage=usage,
            limits=self._user_limits(),
            reserve_after_s=cfg.reserve_after_s,
            reservations=self._held(),
            durations=self.durations.medians,
            waited_s=self.waits.waited_s,
        )

    def _apply(
        self,
        placements: Sequence[tuple[str, str, list[int]]],
        by_job: dict[str, JobRequest],
        agents: dict[str, AgentState],
        to_mark: Sequence[str],
        failures: Sequence[tuple[str, str]],
    ) -> list[Assignment]:
        """One transaction for the whole pass; what was placed is held from now on (`holdings`)."""
        masters = self._gang_masters(placements, by_job, agents)
        assignments = self.store.apply_schedule(
            [Placement(job, agent, gpus, masters.get(by_job[job].gang, "")) for job, agent, gpus in placements],
            to_mark,
            failures,
        )
        now = self.clock.time_ns()
        for a in assignments:
            req = by_job[a.job_id]
            if req.submitted_at:
                self.metrics.dispatch_latency.observe(max(0, now - req.submitted_at) / 1e9)
            if req.max_duration_s:
                self._max_durations[a.job_id] = req.max_duration_s
            self.holdings.add(
                Held(a.job_id, a.agent_id, a.owner, req.cpu, req.memory, tuple(a.gpu_indices), None, req.duration_key)
            )
        if assignments:
            self.metrics.assignments.inc(len(assignments))
        return assignments

    def _admit(
        self,
        w: Waiting,
        statuses: dict[tuple[str, str], JobStatus],
        gone: list[str],
        hits: list[tuple[CacheHit, Waiting]],
        cache: bool = True,
    ) -> str | None:
        """Whether a waiting job takes part in the pass (None) or why not: it no longer waits (into
        `gone`), its dependencies have not finished (the reason returned), or the step cache has its
        results (into `hits` and `gone`: returns ""). `cache`: ask the step cache (a pass that places
        does; a deep queue's full pass, whose results come seconds later, leaves that to one)."""
        if w.depends_on:
            if statuses.get((w.run_id, "#" + w.job_id), JobStatus.PENDING) not in WAITING:
                gone.append(w.job_id)
                return ""
            blocked = [d for d in w.depends_on if statuses.get((w.run_id, d)) != JobStatus.DONE]
            if blocked:
                return "waiting for " + ", ".join(blocked)
        if cache and w.cache and self.copy_cached is not None:
            w.cache = False  # asked once: a miss runs
            try:
                hit = self.store.cache.find_hit(w.job_id)
            except Exception:  # a broken lookup must not stop the pass: the job runs
                log.exception("step cache: looking up job %s failed; it runs", w.job_id)
                hit = None
            if hit is not None:
                hits.append((hit, w))
                gone.append(w.job_id)
                return ""
        return None

    def _heads(
        self, by_user: dict[str, Sequence[Waiting]], shapes: set[Shape], connected: set[str], charge: bool
    ) -> Plan:
        """A heads-only pass (DB thread): places what the full pass would place (planner.place_heads),
        walking the queue only as far as something that waits can still be placed."""
        now, agents, _, usage = self._state(connected, charge, full=False)
        policy = self._policy(now, usage)
        gone: list[str] = []
        hits: list[tuple[CacheHit, Waiting]] = []
        statuses = self._dependency_statuses  # per run, read when first needed
        queue = self.queue

        def include(w: Waiting) -> bool:
            if not queue.live(w):
                return False
            run = None
            if w.depends_on:
                # Kept from pass to pass until a job of the run changes (the journal says so): a
                # thousand dependants blocked at the head cost no query each per pass.
                run = statuses.get(w.run_id)
                if run is None:
                    run = statuses[w.run_id] = self.store.dependency_statuses([w.run_id])
            return self._admit(w, run or {}, gone, hits) is None

        by_job: dict[str, JobRequest] = {}

        def heads(dropped: set[str]) -> Iterator[JobRequest]:
            for w in lazy_order_of(by_user, _request, policy, include, dropped, _arrival):
                by_job[w.job_id] = w.request
                yield w.request

        def gang_members(key: str) -> list[JobRequest]:
            members = [w.request for w in queue.gang(key)]
            by_job.update((r.job_id, r) for r in members)
            return members

        done = place_heads(
            heads,
            list(agents.values()),
            dict(self.holdings.user_gpus),
            dict(self.holdings.user_jobs),
            replace(policy, reservations={j: a for j, a in policy.reservations.items() if j in queue}),
            shapes,
            gang_members,
        )
        self.metrics.heads_walked.observe(done.walked)
        self._placed_on.update(agent_id for _, agent_id, _ in done.placements)  # held on the kept states
        assignments = self._apply(done.placements, by_job, agents, [], [])
        placed = [p[0] for p in done.placements]
        return Plan(assignments, {}, gone + placed, [], WaitInfos(), {}, hits)

    def _plan(self, waiting: list[Waiting], connected: set[str], charge: bool = True) -> Plan:
        """One full scheduling pass (runs on the DB thread); `charge`: count the usage of jobs that ended."""
        store = self.store
        cfg = self.config
        now, agents, running, usage = self._state(connected, charge, full=True)
        # Placed from fresh states: the heads-only passes' kept ones are built again when next needed.
        self._kept_states = None
        self.holdings.take_touched()
        # Statuses within runs that have dependencies: of the dependencies, and of the job itself
        # (a dependant failed by its dependency is no longer waiting).
        statuses = store.dependency_statuses(sorted({w.run_id for w in waiting if w.depends_on}))
        gone: list[str] = []
        queue: list[JobRequest] = []
        reasons: dict[str, str] = {}
        info = WaitInfos()
        hits: list[tuple[CacheHit, Waiting]] = []
        for w in waiting:
            why = self._admit(w, statuses, gone, hits)
            if why:
                reasons[w.job_id] = why
                info[w.job_id] = WaitInfo(0, DEPENDENCIES, why, 0)
                continue
            if why is not None:
                continue
            if w.request.max_duration_s:
                self._max_durations[w.job_id] = w.request.max_duration_s
            queue.append(w.request)
        policy = self._policy(now, usage)
        # Estimated starts worked out when first read (a listing), not in the pass: nothing placed depends
        # on them, and in a drain most passes' are replaced unread. The agents' states and running jobs
        # are this pass's own: nothing changes them after it.
        decision = plan(queue, list(agents.values()), running, policy, lazy_etas=True)
        by_job = {r.job_id: r for r in queue}
        reasons.update(decision.waiting)
        info.merge(decision.info)
        failures = []
        for job_id, why in decision.impossible.items():
            if cfg.fail_unsatisfiable:
                failures.append((job_id, why))
                info.discard(job_id)
            else:
                reasons[job_id] = f"waiting: {why}"
        to_mark = [w.job_id for w in waiting if w.submitted and w.job_id in reasons]
        assignments = self._apply(decision.placements, by_job, agents, to_mark, failures)
        done = gone + [p[0] for p in decision.placements] + [f[0] for f in failures]
        live = {j.job_id for j in running} | {p[0] for p in decision.placements}
        self._max_durations = {j: s for j, s in self._max_durations.items() if j in live or j in reasons}
        return Plan(assignments, reasons, done, to_mark, info, decision.reservations, hits)

    def _gang_masters(
        self,
        placements: Sequence[tuple[str, str, list[int]]],
        requests: dict[str, JobRequest],
        agents: dict[str, AgentState],
    ) -> dict[str, str]:
        """gang key -> MASTER_ADDR:MASTER_PORT for each gang placed in this pass (DB thread): rank 0's
        agent's advertised address, and a port in coordinator/gangs.py's range that no gang whose
        rank 0 runs there holds (nor one placed there earlier in this pass)."""
        out: dict[str, str] = {}
        taken: dict[str, set[int]] = {}
        for job_id, agent_id, _ in placements:
            req = requests[job_id]
            if not req.gang or req.node_rank != 0:
                continue
            used = taken.get(agent_id)
            if used is None:
                used = taken[agent_id] = self.store.gang_ports(agent_id)
            port = pick_port(used)
            used.add(port)
            address = agents[agent_id].address or "127.0.0.1"
            out[req.gang] = f"{address}:{port}"
        return out

    def _held(self) -> dict[str, str]:
        """Last pass's reservations, with the agents held for jobs that preemption served (those win)."""
        # DB thread only (passes and preemption checks take turns there); a job no longer waiting lets go.
        self.preempted_for = {j: a for j, a in self.preempted_for.items() if j in self.queue}
        taken = set(self.preempted_for.values())
        held = {j: a for j, a in self.reservations.items() if a not in taken}
        held.update(self.preempted_for)
        return held

    def _user_limits(self) -> dict[str, UserLimits]:
        limits = self._limits
        if limits is None:
            limits = {u.name: UserLimits(u.share, u.max_gpus, u.max_running) for u in self.store.user_limits()}
            self._limits = limits
        return limits

    def _inventory(self, agent_id: str, data: bytes) -> common_pb2.Inventory:
        """Parsed inventories, re-parsed only when an agent reports a different one."""
        cached = self._inventories.get(agent_id)
        if cached is not None and cached[0] == data:
            return cached[1]
        inv = common_pb2.Inventory()
        inv.ParseFromString(data)
        self._inventories[agent_id] = (data, inv)
        return inv

    def _assignment(self, a: Assignment) -> agent_pb2.JobAssignment:
        # Spec and code parsed straight into the message (no copies of parsed ones: a pass builds thousands).
        out = agent_pb2.JobAssignment(job_id=wire_job_id(a.job_id, a.attempt), run_name=a.run_name)
        spec, code = out.spec, out.code
        spec.MergeFromString(a.spec)
        code.MergeFromString(a.code)
        code.repo_url = public_repo_url(code.repo_url)  # a run stored before the coordinator stripped tokens
        env = {"RUN_NAME": a.run_name, "JOB_ID": a.job_id, "WORKFLOW": spec.workflow, "DSTACK_ATTEMPT": str(a.attempt)}
        if spec.gang and a.master:  # a member of a multi-node gang: its rendezvous (coordinator/gangs.py)
            env.update(member_env(a.master, spec.node_rank, spec.nnodes))
        if code.commit:
            env.update(REPO_COMMIT=code.commit, REPO_BRANCH=code.branch, REPO_URL=code.repo_url)
        out.env.update(env)
        out.gpu_indices.extend(a.gpu_indices)
        if a.inputs:
            out.inputs.extend(artifact_input_to_proto(i) for i in a.inputs)
        secrets = self.secrets_for(a.owner)
        if secrets:
            out.secrets.update(secrets)
        return out

    # ---- leases ------------------------------------------------------------------------------
    def _lease_check_s(self) -> float:
        """How often the lease loop checks."""
        return min(1.0, self.config.lease_timeout_s / 4)

    async def _lease_loop(self) -> None:
        interval = self._lease_check_s()
        forget_every = min(60.0, self.config.forget_lost_agents_after_s / 2)
        next_forget = self.clock.monotonic()
        next_flush = self.clock.monotonic() + HEARD_FLUSH_S
        while True:
            expected = self.clock.monotonic() + interval
            await self.clock.sleep(interval)
            late = self.clock.monotonic() - expected
            self.metrics.lease_check_lateness.observe(max(0.0, late))
            if self.guard_stalls and late > STALL_S:
                # We did not listen for `late` seconds: what agents sent meanwhile is still unread, and the
                # check below may run before it is read. Not their silence: every lease starts afresh (as at
                # start-up); an agent that is really gone is lost a lease later.
                log.warning("lease check %.1f s late (the coordinator stalled): every lease renewed", late)
                self._warn_starved(late)
                self.leases.extend_all(self._lease_deadline())
            try:
                if self._renewal_failed:
                    # The store could not record losses (a full disk), nor agents' hellos: not the agents'
                    # fault. Once it writes again, every online agent gets a fresh lease (as at start-up);
                    # one that is really gone is lost a lease later.
                    self._renewal_failed = False
                    try:
                        await self.db(self.store.extend_all_leases, self.lease_until())
                    except Exception:
                        self._renewal_failed = True  # still full: again at the next check
                        raise
                    self.leases.extend_all(self._lease_deadline())
                if self.clock.monotonic() >= next_flush:
                    next_flush = self.clock.monotonic() + HEARD_FLUSH_S
                    await self._flush_heard()
                lost, requeued = await self._expire_leases()
            except Exception:
                # The store refuses writes (a full disk): agents' hellos fail too.
                self._renewal_failed = True
                log.exception("lease check failed")
                continue
            try:
                await self._after_lease_check(lost, requeued)
            except Exception:
                # One of its steps' bugs or store failures must not end the loop: no agent would be marked
                # lost again, nor any job stopped for its max_duration, preempted or requeued by the sweep.
                log.exception("the lease check's follow-up failed")
            if self.clock.monotonic() >= next_forget:
                next_forget = self.clock.monotonic() + forget_every
                try:
                    await self._forget_lost_agents()
                except Exception:
                    log.exception("forgetting lost agents failed")

    async def _after_lease_check(self, lost: list[str], requeued: list[str]) -> None:
        """What a lease check does once the leases that ran out are recorded: the lost agents let go of,
        and the loop's sweeps, each of which goes on though one before it failed."""
        try:
            self.metrics.agents_lost.inc(len(lost))
            self.metrics.longest_silence.set(self.leases.max_gap_s)
            for agent_id in lost:
                log.warning(
                    "agent %s lost: its lease ran out (longest silence of any agent so far: %.1f s)",
                    agent_id,
                    self.leases.max_gap_s,
                )
                self.leases.forget(agent_id)
                self.sessions.end(agent_id)  # nothing read late on its old stream is applied
                self.unheard.forget(agent_id)
                self.unheard.mark(agent_id)  # forgotten `--forget-lost-agents-after` from now
                self.hub.drop(agent_id)
            if self.quarantine.expire(self.clock.monotonic()):
                self.kick()
            if requeued:
                await self._requeued(requeued)
        finally:
            if lost:
                self.watchers.notify_all()
                self.kick()
        steps = (
            self.settle_gangs,
            self._requeue_sweep,
            self._undelivered_sweep,
            self._stop_overdue,
            self._preempt_by_policy,
        )
        for step in steps:
            try:
                await step()
            except Exception:
                log.exception("lease check: %s failed", step.__name__.strip("_").replace("_", " "))

    async def settle_gangs(self) -> None:
        """The gang sweep (coordinator/store/gangs.py): a member that failed fails its gang, one that
        was requeued requeues it; the other members are aborted on their agents."""
        try:
            settled = await self.db(self.store.settle_gangs)
        except Exception:
            log.exception("gang sweep failed")
            return
        for wire_id, agent_id in settled.stops:
            log.info("job %s: aborted with its gang", wire_id)
            stop = agent_pb2.StopJob(job_id=wire_id, abort=True)
            self.hub.send(agent_id, agent_pb2.CoordinatorMessage(stops=[stop]))
        if settled.requeued:
            await self._requeued(settled.requeued)
        if settled.runs:
            self.watchers.notify(settled.runs)
            self.kick()

    def _ran_ns(self, job_id: str, started_at: int, seen_at: int = 0) -> int:
        """How long the job has run, on the monotonic clock (`seen_at`: when the coordinator saw it
        start, as a wall stamp, a better stamp than the agent's `started_at` for a job it did not see
        start in this process)."""
        return int((self.clock.monotonic() - self.started.at(job_id, seen_at or started_at, started_at)) * NS)

    def _ran_ns_all(self, jobs: Sequence[Held]) -> list[int]:
        """`_ran_ns` of each of these jobs (all started), at one instant."""
        at = self.started.at_many((j.job_id, j.started_at or 0, j.started_at or 0) for j in jobs)
        mono = self.clock.monotonic()
        return [int((mono - m) * NS) for m in at]

    def _overdue(self) -> list[str]:
        """Jobs that ran past their `max_duration`, timed on the monotonic clock (DB thread)."""
        return [
            job_id
            for job_id, started_at, seen_at, limit_s in self.store.jobs_with_max_duration()
            if self._ran_ns(job_id, started_at, seen_at) >= limit_s * NS
        ]

    async def _stop_overdue(self) -> None:
        """Jobs past their `max_duration` are stopped (SIGTERM, the grace period, then killed)."""
        try:
            overdue = await self.db(lambda: self.store.stop_for_max_duration(self._overdue()))
        except Exception:
            log.exception("max_duration check failed")
            return
        for order in overdue:
            log.info("job %s: max_duration exceeded, stopping it", order.wire_id)
            self.hub.send(order.agent_id, agent_pb2.CoordinatorMessage(stops=[agent_pb2.StopJob(job_id=order.wire_id)]))

    async def _preempt_by_policy(self) -> None:
        """Applies the preemption policy (coordinator/preemption.py): interruptible jobs are preempted
        for a job that waited past `--reserve-after` (reservation) or, below its user's fair share,
        past `--preempt-after` (fair share), and fits nowhere now."""
        cfg = self.config
        if (math.isinf(cfg.reserve_after_s) and (math.isinf(cfg.preempt_after_s) or not cfg.fairshare)) or not len(
            self.queue
        ):
            return
        # First whether any job may be preempted at all, on the DB thread (a tuple per job on an agent, each
        # spec parsed once): only then the jobs that waited long, a walk of all of them here on the event
        # loop and a read of each on the DB thread. Issue 16: at a deep queue with agents connected, that
        # walk (every job waiting past the threshold, every second) and a record per running job were
        # done every second to find no interruptible job, a cost that grew with the queue's depth.
        try:
            if not await self.db(self.store.any_preemptible_running):
                self.waits.tidy(self.queue, len(self.queue))
                return
        except Exception:
            log.exception("preemption check failed")
            return
        after = min(cfg.reserve_after_s, cfg.preempt_after_s if cfg.fairshare else math.inf)
        starved = self.waits.longer_than(after, self.queue)  # on the monotonic clock
        if not starved:
            return
        try:
            chosen = await self.db(self._victims, self.hub.connected_ids(), starved)
        except Exception:
            log.exception("preemption check failed")
            return
        if chosen is not None:
            choice, name = chosen
            await self.preempt(list(choice.victims), f"preempted for {choice.for_owner}'s job {name} ({choice.cause})")

    def _victims(self, connected: set[str], waited_long: list[str]) -> tuple[Preemption, str] | None:
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
        reservations = self._held()
        since = self._may_be_served(waited_long, now, reservations)
        starved = [
            replace(w, submitted_at=since.get(w.id) or now - int(self.waits.waited_s(w.id) * NS))
            for w in self.store.starved_among(list(since))
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
            reservations=reservations,
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

    def _may_be_served(self, waited_long: list[str], now: int, reservations: Mapping[str, str]) -> dict[str, int]:
        """Of the jobs that waited long, those `preemption.choose` could serve now, each with when it started
        waiting as the policy reads it (`now` minus its wait; 0: left the queue): the rest are left out
        before their rows are read (DB thread). Issue 16: every such row was read and its spec parsed every
        second, 100,000 of them at full size, while `choose` looks at only the first job of each kind.

        Why this leaves the decision as it was: `choose` walks the jobs in their rows' order (`submitted_at`,
        `store.starved_among`) and tries each cause once per (cause, shape, owner or reserved agent): once
        one job of such a class found nothing, the others of it are skipped, and whether a job finds victims
        depends only on its class (its shape, owner, reservation; its quota on owner and shape). So only the
        first job of a class that is old enough for the cause can decide, and each (owner, shape, reserved
        agent)'s first for each cause is kept, ties on `submitted_at` all kept (the rows' order settles
        them). Kept too, since memory cannot say: a job with dependencies at or before its class's first
        (the store reads whether they are done) and a job that left the queue meanwhile. Left out at once:
        interruptible jobs and gang members, which the policy never serves. What a job's wait is compared
        with is worked out as `choose` does (`now` minus the monotonic wait, in whole nanoseconds)."""
        cfg = self.config
        causes: list[float] = []
        if not math.isinf(cfg.reserve_after_s):
            causes.append(cfg.reserve_after_s)
        if cfg.fairshare and not math.isinf(cfg.preempt_after_s):
            causes.append(cfg.preempt_after_s)
        keep: dict[str, int] = {}
        Class = tuple[int, tuple[str, Shape], str | None]  # (cause, (owner, shape), reserved agent)
        firsts: dict[Class, tuple[int, list[str]]] = {}  # class -> (its first's stored_at, the ids at it)
        waits_from: dict[str, int] = {}
        with_deps: list[tuple[Class, int, str]] = []
        get, since_of, mono = self.queue.get, self.waits.instants().get, self.clock.monotonic()
        for job_id in waited_long:  # one dict look-up or two and a few comparisons each: no row, no parse
            w = get(job_id)
            if w is None:
                keep[job_id] = 0  # left the queue since: the store says whether it still waits
                continue
            kind = w.kind
            if kind is None:
                continue  # interruptible, or a gang's member
            at = since_of(job_id)
            waits_from[job_id] = start = now - int((mono - at) * NS) if at is not None else now
            waited = (now - start) / NS
            held = reservations.get(job_id) if reservations else None
            for i, after in enumerate(causes):
                if waited < after:
                    continue
                cls = (i, kind, held)
                if w.depends_on:
                    with_deps.append((cls, w.stored_at, job_id))
                    continue
                first = firsts.get(cls)
                if first is None or w.stored_at < first[0]:
                    firsts[cls] = (w.stored_at, [job_id])
                elif w.stored_at == first[0]:
                    first[1].append(job_id)
        for dep_cls, stored_at, job_id in with_deps:
            first = firsts.get(dep_cls)
            if first is None or stored_at <= first[0]:
                keep[job_id] = waits_from[job_id]
        for _, ids in firsts.values():
            for job_id in ids:
                keep[job_id] = waits_from[job_id]
        return keep

    def _heads_agent_states(self, connected: set[str], reread: bool) -> dict[str, AgentState]:
        """The connected agents with what their running jobs hold, as a heads-only pass sees them (DB
        thread): kept from pass to pass, and only the agents whose holdings changed since the last one
        (journal changes, placements) or that it placed on (the planner holds on the states it is given)
        built again, each as `_idle_agent_states` and the holdings would build it. At 5,000 agents, a
        fresh state of every agent per pass was a third of a pass that places a few jobs. Everything is
        built again when the connected set or the agents' rows change, or while an agent is quarantined
        (its hold ends with time, not with an event)."""
        touched = self.holdings.take_touched()
        placed, self._placed_on = self._placed_on, set()
        kept = self._kept_states
        if reread and kept is not None:
            self._read_agent_rows(connected)  # a new list only if a row differs: then all is built again below
        if (
            kept is None
            or self._agent_rows is None
            or self._agent_rows is not self._kept_from_rows  # a full pass read them again meanwhile
            or self._kept_for != connected
            or self.quarantine.held()
        ):
            agents = self._idle_agent_states(connected, reread and kept is None)
            for agent_id, held in self.holdings.agents.items():
                if (a := agents.get(agent_id)) is not None:
                    _hold_all(a, held)
            self._kept_states, self._kept_for, self._kept_from_rows = agents, frozenset(connected), self._agent_rows
            self._kept_rows = {row.id: row for row in self._agent_rows or () if row.id in agents}
            return agents
        rebuild = touched | placed
        if reread:
            # The safety net for the kept states themselves: any whose holds differ from the holdings is
            # built again (a comparison per agent, not a new state per agent).
            empty = AgentHeld()
            holdings = self.holdings.agents
            for agent_id, a in kept.items():
                h = holdings.get(agent_id, empty)
                if (a.used_cpu, a.used_memory, a.busy_gpus, a.jobs) != (h.cpu, h.memory, h.gpus, h.jobs):
                    rebuild.add(agent_id)
        for agent_id in rebuild:
            row = self._kept_rows.get(agent_id)
            if row is None:
                continue  # not one of the pass's agents
            # A new object in the same place of the dict: the agents' order (best fit's tie-break) stays.
            a = kept[agent_id] = self._fresh_state(row)
            if (holding := self.holdings.agents.get(agent_id)) is not None:
                _hold_all(a, holding)
        return kept

    def _agent_states(self, connected: set[str]) -> dict[str, AgentState]:
        """The connected agents with what their jobs hold (as a scheduling pass sees them)."""
        agents = self._idle_agent_states(connected)
        for alloc in self.store.active_allocations():
            if (a := agents.get(alloc.agent_id)) is not None:
                a.hold(alloc.cpu, alloc.memory, alloc.gpu_indices)
        return agents

    def _idle_agent_states(self, connected: set[str], reread: bool = True) -> dict[str, AgentState]:
        """The connected agents' capacities, with nothing held yet (DB thread). `reread`: read the online
        agents' rows again even if the connected set is as it was (an inventory may have changed)."""
        agents: dict[str, AgentState] = {}
        held = self.quarantine.held()  # one read: the mapping is replaced, never changed, on the loop
        now = self.clock.monotonic()
        rows = self._agent_rows
        if rows is None or reread or self._agent_rows_for != connected:
            rows = self._read_agent_rows(connected)
        for row in rows:
            if row.id not in connected:
                continue
            if held.get(row.id, -math.inf) > now:
                continue  # it may still run an attempt that is over, on GPUs it would otherwise offer
            agents[row.id] = self._fresh_state(row)
        return agents

    def _held_of_rows(self, rows: list[OnAgentRow]) -> list[Held]:
        """The records of the jobs on agents as read (DB thread): the one made last time for a row read the
        same again, a new one for a row that differs (then Holdings.sync finds it the same object as
        what it holds, unless a change came between)."""
        last, made = self._held_of_row, {}
        held = []
        for r in rows:
            h = last.get(r)
            if h is None:
                h = _held(on_agent_of(r))
            made[r] = h
            held.append(h)
        self._held_of_row = made  # only what was read this time: it never outgrows the running jobs
        return held

    def _read_agent_rows(self, connected: set[str]) -> list[AgentRow]:
        """The online agents' rows read again (DB thread). What a pass uses of them (id, name, inventory)
        is read first, and when none differs from the last read the kept list stays, and with it the
        agents' kept states made from it (`_heads_agent_states`): every REREAD_S, a record per row and a
        new state per agent for nothing were most of the agents' part of the reread's spike."""
        keys = self.store.online_agent_keys()
        if self._agent_rows is None or keys != self._agent_row_keys:
            self._agent_rows, self._agent_row_keys = self.store.online_agents(), keys
        self._agent_rows_for = frozenset(connected)
        return self._agent_rows

    def _fresh_state(self, row: AgentRow) -> AgentState:
        """An agent's state with nothing held, on its row's capacities (parsed once per inventory)."""
        cap = self._capacities.get(row.id)
        if cap is None or cap[0] != row.inventory:
            inv = self._inventory(row.id, row.inventory)
            cap = self._capacities[row.id] = (
                row.inventory,
                AgentState(
                    agent_id=row.id,
                    name=row.name,
                    cpu_total=float(inv.cpu_count),
                    memory_total=inv.memory_total_bytes,
                    gpus=[Gpu(g.index, g.name, g.memory_total_bytes) for g in inv.gpus],
                    max_jobs=inv.max_jobs or 1_000_000,
                    containers=inv.runtime == "docker",
                    # An address that is none (an agent's own word) is not handed to a gang's other members.
                    address=_address_of(inv.advertise_address, inv.hostname),
                    # Its disk below its floor (a new inventory, so a new template): it takes no job.
                    draining=draining_of(inv),
                ),
            )
        t = cap[1]
        # A fresh state per pass on the template's capacities (its GPU list is never changed).
        return AgentState(
            t.agent_id,
            row.name,
            t.cpu_total,
            t.memory_total,
            t.gpus,
            t.max_jobs,
            t.containers,
            address=t.address,
            draining=t.draining,
        )

    def _requeue_due(self) -> None:
        """A requeue was committed (a job's row back to waiting) whose jobs are not known or not read back: until
        a read of every waiting job made after now works, the queue may lack them (`_requeued`, `_requeue_sweep`)."""
        self._requeues_due += 1

    async def _requeued(self, job_ids: Sequence[str] | None = None, tries: int = REQUEUE_TRIES) -> bool:
        """Jobs back to waiting as a new attempt (their rows say so) join the queue: these, or (None) every
        waiting job the queue lacks; returns whether the read worked. It raises nothing but cancellation: a read
        that fails is tried again, `tries` in all with a doubling pause; then the requeue is owed and the lease
        loop reads every waiting job at each check until one such read works (`_requeue_sweep`). Before, a
        failed read raised out of the report's follow-up (the message unacked, and its repeat found nothing more
        to requeue), out of a hello, or out of the lease loop (which ended): the job's row said waiting, the
        queue never had it, and in a quiet pool it waited until the coordinator restarted. A job already in
        the queue is not added again (the queue is keyed by job; a placed job that a stale read adds back is not
        placed twice: placements move only waiting rows, coordinator/store/jobs.py)."""
        due = self._requeues_due  # what a read from here on sees committed
        if self._requeue_failing:
            tries = 1  # reads fail already: one try each, the lease loop's sweep the rest (no pile of retries)
        pause = REQUEUE_PAUSE_S
        for attempt in range(1, tries + 1):
            try:
                # By their keys when known: a whole read costs the queue's depth (~1.2 s of CPU at 100,000 queued).
                if job_ids is None:
                    rows = await self.db(self.store.waiting_jobs)
                else:
                    rows = await self.db(self.store.waiting_jobs_of, job_ids)
                break
            except Exception as e:
                if attempt < tries:
                    log.debug("reading the jobs back to waiting failed (%s); trying again in %.2f s", e, pause)
                    await asyncio.sleep(pause)
                    pause *= 2
                    continue
                self._requeues_due += 1  # owed, whoever called (`_requeue_sweep` reads again)
                if not self._requeue_failing:
                    self._requeue_failing = True
                    log.error(
                        "reading the jobs back to waiting failed %d times (%s): jobs requeued now are not queued"
                        " until a read works; read again at every lease check (every %.1f s)",
                        tries,
                        e,
                        self._lease_check_s(),
                        exc_info=e,
                    )
                return False
        added = False
        for row in rows:
            if row.id not in self.queue:
                self.queue.add_row(row)
                self.waits.start(row.id)
                added = True
        if job_ids is None:  # every waiting job: what was owed is paid
            self._requeues_read = max(self._requeues_read, due)
        if self._requeue_failing and self._requeues_read >= self._requeues_due:
            self._requeue_failing = False
            log.info("the jobs back to waiting were read again: every requeued job is queued")
        if added:
            self.kick(finished=False)
        return True

    async def _undelivered_sweep(self) -> None:
        """The lease loop's backstop for `_fail_undelivered`: the scheduler tries it after a pass, and none may
        come while the queue is empty."""
        if self._undelivered:
            await self._fail_undelivered()

    async def _requeue_sweep(self) -> None:
        """The lease loop's backstop: a requeue whose read failed (`_requeued`) is read again, once per check."""
        if self._requeues_read < self._requeues_due:
            await self._requeued(None, tries=1)

    def _unheard_for_long(self) -> list[str]:
        """Agents with no job, lost (or never connected, or removed) and not heard from for
        `--forget-lost-agents-after` on the monotonic clock (DB thread)."""
        unused = self.store.unused_agents()
        self.unheard.keep((agent_id, 0) for agent_id, _ in unused)
        after = self.config.forget_lost_agents_after_s
        return [a for a, stamp in unused if self.clock.monotonic() - self.unheard.at(a, stamp) >= after]

    async def _forget_lost_agents(self) -> None:
        try:
            gone = await self.db(lambda: self.store.forget_agents(self._unheard_for_long()))
        except Exception:
            log.exception("forgetting lost agents failed")
            return
        for agent_id in gone:
            log.info("agent %s forgotten: lost for over %.0f s", agent_id, self.config.forget_lost_agents_after_s)
            self._inventories.pop(agent_id, None)
            self.leases.forget(agent_id)

    # ---- agent stream ------------------------------------------------------------------------
    def on_agent_removed(self, agent_id: str, failed_jobs: Sequence[str]) -> None:
        """An admin removed the agent (its row says so, its jobs failed): it is told to abort them, if
        it still listens, then its stream is dropped (it reconnects, and its credential is refused)."""
        if failed_jobs:
            stops = [agent_pb2.StopJob(job_id=j, abort=True) for j in failed_jobs]
            self.hub.send(agent_id, agent_pb2.CoordinatorMessage(stops=stops))
        self.sessions.end(agent_id)
        self.quarantine.forget(agent_id)
        self.unheard.forget(agent_id)
        self.unheard.mark(agent_id)
        self.hub.drop(agent_id)
        self._inventories.pop(agent_id, None)
        self.leases.forget(agent_id)
        self.watchers.notify_all()
        self.kick()  # its jobs' dependants may have failed; its resources are gone from the next pass

    def open_session(self, agent_id: str, active: Sequence[str]) -> int:
        """An agent's new stream, before anything of its hello is read: its session epoch. Until its
        hello is reconciled, everything it says it runs holds the agent (no new job lands there)."""
        epoch = self.sessions.open(agent_id)
        self.quarantine.hold(agent_id, active, self.clock.monotonic() + quarantine_bound_s(self.config.lease_timeout_s))
        return epoch

    def stale_attempt_ended(self, agent_id: str, wire_id: str) -> None:
        """The agent reported the end of an attempt that is over (its final update, refused): once
        none is left, its capacity is offered again."""
        if self.quarantine.ended(agent_id, wire_id):
            self.kick()

    async def on_hello(self, agent_id: str, msg: agent_pb2.AgentMessage) -> agent_pb2.CoordinatorMessage:
        """Raises Unauthenticated for an agent removed since its stream was authenticated (a removal
        racing with its hello): it must not stay connected."""
        hello = msg.hello
        status = await self.db(
            self.store.agent_online, agent_id, hello.inventory.SerializeToString(), self.lease_until()
        )
        if status not in (AgentStatus.ONLINE, AgentStatus.PENDING):
            raise Unauthenticated(agent_removed(agent_id))
        if status == AgentStatus.ONLINE:
            self.agent_online(agent_id)
        self._disk_verdict(agent_id, hello.inventory)
        self.unheard.forget(agent_id)  # heard from: a later loss counts from then
        # Results the agent kept while it could not reach us come first.
        await self.on_message(agent_id, msg)
        active = list(hello.active_job_ids)
        reply = agent_pb2.CoordinatorMessage()

        def reconcile() -> tuple[list[str], list[str], list[str], dict[str, int], list[str], set[str]]:
            # The agent knows each job by its current attempt's id: an id of an earlier attempt (it
            # was lost, and the job requeued meanwhile) is stale like a finished job's, and aborted.
            jobs = {wire_job_id(j.id, j.attempt): j for j in self.store.jobs_on_agent(agent_id)}
            unstarted = [j for w, j in jobs.items() if j.status == JobStatus.ASSIGNED and w not in active]
            resend = [j.id for j in unstarted if not j.stop_requested]
            # Stopped while the agent was away, before it ever got the job: it ends here.
            requeued = self.store.stop_unstarted([j.id for j in unstarted if j.stop_requested])
            lost = [j.id for w, j in jobs.items() if j.status != JobStatus.ASSIGNED and w not in active]
            stop = [w for w, j in jobs.items() if j.stop_requested and w in active]
            requeued += self.store.fail_jobs_lost_by_agent(agent_id, lost)
            stale = [w for w in active if w not in jobs]
            # Of those, the ones ended for its loss may still run: they hold the agent until it confirms
            # them dead (their final update) or the bound passes (coordinator/fencing.py). The others
            # ended by the agent's own report (it lists them for lines still owed): nothing runs.
            fenced = self.store.agent_lost_attempts(agent_id, stale)
            positions = self.store.log_positions([w for w in active if w in jobs])
            return resend, stop, stale, positions, requeued, fenced

        resend, stop, stale, positions, requeued, fenced = await self.db(reconcile)
        self.quarantine.narrow(agent_id, fenced)
        if fenced:
            log.warning(
                "agent %s came back running attempts that are over: %s; aborting them",
                agent_id,
                ", ".join(sorted(fenced)),
            )
        if requeued:
            await self._requeued(requeued)
        for a in await self.db(self.store.assignments_for_agent, agent_id, resend):
            # One that cannot be built must not fail the hello (the agent could never connect again).
            if (built := self._assignment_or_none(a)) is not None:
                reply.assignments.append(built)
        if self._undelivered:
            await self._fail_undelivered()
        reply.stops.extend(agent_pb2.StopJob(job_id=j) for j in stop)
        reply.stops.extend(agent_pb2.StopJob(job_id=j, abort=True) for j in stale)
        fence_after_ms, strict = self.fence_policy()
        reply.hello_ack.CopyFrom(
            agent_pb2.HelloAck(
                heartbeat_interval_ms=int(self.config.heartbeat_interval_s * 1000),
                lease_timeout_ms=int(self.config.lease_timeout_s * 1000),
                log_positions=[agent_pb2.LogAck(job_id=j, seq=s) for j, s in positions.items()],
                self_fence_after_ms=fence_after_ms,
                self_fence_strict=strict,
                reconnect_grace_ms=self.published_grace_ms(),
                log_blocks=True,  # the store takes LogBatch.blocks (coordinator/store/logs.py)
            )
        )
        self.watchers.notify_all()
        self.kick()
        return reply

    async def on_message(
        self,
        agent_id: str,
        msg: agent_pb2.AgentMessage,
        screen_logs: LogScreen | None = None,
        handling: Handling | None = None,
        environments: Environments = (),
        on_foreign: Callable[[Sequence[UpdateAck]], None] | None = None,
    ) -> agent_pb2.CoordinatorMessage | None:
        """Stores logs, then updates (logs of a job are stored before it is reported finished).
        `screen_logs`, if given, runs on the DB thread in the same call as the insert and returns the
        batches that may be stored (coordinator/app/agent_stream.py: whose lines they are): one trip
        to the DB thread per log batch, not two, for an agent sending hundreds a second. The updates are
        screened in their batch's store call (coordinator/reports.py): only the agent's acting attempts'
        are applied, with their `environments` (wire job id, record part); the others are acknowledged
        unapplied and handed to `on_foreign` (the stream's warning)."""
        reply = agent_pb2.CoordinatorMessage()
        await self._store_inventory(agent_id, msg)
        if msg.HasField("heartbeat") and msg.heartbeat.seq:
            # The renewal is written (a write that fails raised above: no ack), so the agent may count its
            # lease from when it sent this heartbeat. The stream checks that its session is still current
            # before it sends the ack (agent_stream.py).
            reply.lease_ack = msg.heartbeat.seq
        if msg.logs:
            kept, acks, stored = await self.db(self._insert_logs, msg.logs, screen_logs)
            if handling is None or not handling.lines_counted:
                self.metrics.log_lines.inc(sum(batch_lines(b) for b in kept))
                if handling is not None:
                    handling.lines_counted = True
            reply.log_acks.extend(log_acks_to_proto(acks))
            if stored:  # committed: handed to the runs' followers (coordinator/log_feed.py), no wake-up to read
                await self._hand_off(stored)
        if msg.updates:
            # With the other agents' messages of this turn of the loop, in one store call (coordinator/reports.py).
            # Once they are committed, what follows runs to its end whether or not this task is still there to
            # wait for it (`_report`): the stream's end cancels this task, not the engine's work.
            answer: asyncio.Future[UpdatesAnswer] = asyncio.get_running_loop().create_future()
            updates = job_updates_from_proto(msg.updates)
            self._report(
                agent_id, updates, environments, on_foreign, reply, functools.partial(_answer, answer, agent_id)
            )
            await answer
        if reply.log_acks or reply.update_acks or reply.lease_ack:
            return reply
        return None

    def updates_then(
        self,
        agent_id: str,
        msg: agent_pb2.AgentMessage,
        environments: Environments,
        on_foreign: Callable[[Sequence[UpdateAck]], None] | None,
        then: Callable[[UpdatesAnswer], None],
    ) -> None:
        """`on_message` for a message of updates alone, without a task: the updates join their report batch
        now, and `then` is called on the event loop once they are applied and what follows is done (`_report`),
        with the reply (its acks), the message's error (no ack: it is sent again), or None (the batch's call
        was cancelled: we stop) (coordinator/app/agent_stream.py: the stream's direct path, one task step less
        and no future per message)."""
        updates = job_updates_from_proto(msg.updates)
        self._report(agent_id, updates, environments, on_foreign, agent_pb2.CoordinatorMessage(), then)

    def _report(
        self,
        agent_id: str,
        updates: list[JobUpdate],
        environments: Environments,
        on_foreign: Callable[[Sequence[UpdateAck]], None] | None,
        reply: agent_pb2.CoordinatorMessage,
        then: Callable[[UpdatesAnswer], None],
    ) -> None:
        """One agent message's updates into their report batch. Once the batch is committed, what follows from
        them is the engine's, not the stream's: the acks into `reply`, then the jobs requeued and added join the
        queue, a gang whose member ended is settled, freed capacity asks for a pass, followers are told. It runs
        in the batch's hand-back, or, when it must wait for the store (a requeue, a gang to settle: rare), on a
        task of the engine's own (`_following`) that no stream's end cancels: a stream that ends meanwhile (its
        agent disconnected, partitioned, lost, removed) only gets no answer. Before, the stream's own task did
        this, and a job whose retry was committed as its agent's stream ended never joined the queue: in a quiet
        pool it waited until the coordinator restarted. `then` gets `reply` once all of it is done (the acks
        follow what they acknowledge, as before), the message's error, or None (the batch's call was
        cancelled, or the follow-up, by `stop`: the coordinator stops)."""

        def applied(outcome: Outcome) -> None:
            if outcome is None or isinstance(outcome, BaseException):
                then(outcome)
                return
            try:
                kept = self._updates_applied(agent_id, updates, outcome, reply, on_foreign)
                if outcome.requeued or self._gangs_to_settle(outcome, kept):
                    self._follow_up(self._updates_finished_later(outcome, kept), reply, then)
                    return
                self._enqueue_added(outcome)
                self._updates_over(kept)
                self.watchers.notify(outcome.changed_runs)
            except Exception as e:  # as on_message's own error would be: the stream ends (services/agent.py)
                if outcome.requeued:  # committed, and not read back: owed to the lease loop's sweep
                    self._requeue_due()
                then(e)
                return
            then(reply)

        self.reports.apply_then(agent_id, updates, environments, applied)

    def _follow_up(
        self,
        steps: Coroutine[Any, Any, None],
        reply: agent_pb2.CoordinatorMessage,
        then: Callable[[UpdatesAnswer], None],
    ) -> None:
        task = asyncio.get_running_loop().create_task(steps, name="reports' follow-up")
        self._following.add(task)
        task.add_done_callback(self._following.discard)
        task.add_done_callback(lambda t: then(None if t.cancelled() else (t.exception() or reply)))

    async def _updates_finished_later(self, res: UpdateResult, updates: list[JobUpdate]) -> None:
        if res.requeued:
            await self._requeued(res.requeued)
        self._enqueue_added(res)
        if self._gangs_to_settle(res, updates):
            await self.settle_gangs()
        self._updates_over(updates)
        self.watchers.notify(res.changed_runs)

    def _updates_applied(
        self,
        agent_id: str,
        updates: list[JobUpdate],
        res: UpdateResult,
        reply: agent_pb2.CoordinatorMessage,
        on_foreign: Callable[[Sequence[UpdateAck]], None] | None,
    ) -> list[JobUpdate]:
        """What follows at once from a message's applied reports: its acks into `reply`, the foreign ones
        handed to `on_foreign`, the runs of jobs that started timed. Returns its updates that were applied."""
        reply.update_acks.extend(update_acks_to_proto(res.acks))
        if res.foreign:
            foreign = {ack.job_id for ack in res.foreign}
            updates = [u for u in updates if u.job_id not in foreign]
            for ack in res.foreign:
                if ack.status in TERMINAL_JOB:  # a stale attempt's end: its process is gone, its capacity free
                    self.stale_attempt_ended(agent_id, ack.job_id)
            if on_foreign is not None:
                on_foreign(res.foreign)
        for u in updates:  # a job's run is timed from here, on the monotonic clock (max_duration)
            if u.status == JobStatus.RUNNING and u.time_ns:
                self.started.mark(parse_wire_job_id(u.job_id)[0], u.time_ns)
        return updates

    def _enqueue_added(self, res: UpdateResult) -> None:
        for added in res.added:  # jobs a provider program added to its run (coordinator/provided_jobs.py)
            assert isinstance(added, AddedJobs)
            a = added
            self.enqueue_run(a.run_id, a.jobs, a.owner, a.priority, a.submitted_at, a.workflow, a.stored_at)
        if res.freed:
            self.kick()

    @staticmethod
    def _gangs_to_settle(res: UpdateResult, updates: list[JobUpdate]) -> bool:
        # A gang's member may have ended (or been requeued): only then has the gang sweep work to do.
        return bool(res.requeued or (res.gangs and any(u.status in TERMINAL_JOB for u in updates)))

    def _updates_over(self, updates: list[JobUpdate]) -> None:
        for u in updates:  # a job's last update comes after its last line: forget its run
            if u.status in TERMINAL_JOB:
                self._job_runs.pop(parse_wire_job_id(u.job_id)[0], None)

    def _warn_starved(self, late: float) -> None:
        """A stall that ate half of the agents' count or more: while we do not run, no heartbeat is acked, and
        an agent cannot tell that from a partition, so with a few more seconds it stops its healthy jobs.
        Nothing an agent may safely count on shows it (docs/lifecycle.md, "Starvation"): a longer lease does."""
        after_ms, _ = self.fence_policy()
        if after_ms and late >= after_ms / 2000:
            log.warning(
                "agents stop their jobs %.1f s after their last acknowledged heartbeat, and this stall took %.1f s"
                " of that: if stalls like it recur (the host is starved of CPU), raise --lease-timeout (now %g s)",
                after_ms / 1000,
                late,
                self.config.lease_timeout_s,
            )

    async def _expire_leases(self) -> tuple[list[str], list[str]]:
        """Agents whose lease (in memory) ran out are marked lost in the store, unless a message of theirs
        is read before the store gets to them. Returns those marked lost, and their jobs requeued."""
        now = self.clock.monotonic()
        expired = self.leases.expired(now)
        if not expired:
            return [], []
        requeued: list[str] = []
        lost = await self.db(
            self.store.lose_agents,
            expired,
            lambda a: self.leases.still_expired(a, now),
            self.clock.time_ns(),
            requeued,
        )
        for agent_id in set(expired) - set(lost):
            if self.leases.still_expired(agent_id, now):  # not online in the store (removed, retired): no lease
                self.leases.forget(agent_id)
        return lost, requeued

    async def _flush_heard(self) -> None:
        """When each agent was last heard from, into the store in one batch; and a lease for any agent the
        store has online that holds none (approved while connected, in a race with its hello)."""
        heard = self.leases.take_heard()

        def write() -> list[str]:
            if heard:
                self.store.record_heard(heard)
            return self.store.online_agent_ids()

        try:
            online = await self.db(write)
        except Exception:
            self.leases.put_back(heard)
            raise
        for agent_id in online:
            if not self.leases.holds(agent_id):
                self.leases.grant(agent_id, self._lease_deadline())

    async def _store_inventory(self, agent_id: str, msg: agent_pb2.AgentMessage) -> None:
        """A heartbeat with a changed inventory is stored. The lease is not renewed here: every message
        renewed it as it was read off the stream (`heard`, services/agent.py), which is when the agent was
        last heard from. Renewing again here, once the message's turn came behind the database, stretched a
        silent agent's lease by that wait: the agent counts its own lease (self-fencing) from its send, we
        from the receipt (`fence_policy`), and the receipt is the read."""
        if msg.HasField("heartbeat") and msg.heartbeat.HasField("inventory"):
            inv = msg.heartbeat.inventory.SerializeToString()
            await self.db(self.store.heartbeat, agent_id, inv, self.lease_until())
            self._disk_verdict(agent_id, msg.heartbeat.inventory)  # stored: a pass kicked now reads it

    def _disk_verdict(self, agent_id: str, inv: common_pb2.Inventory) -> None:
        """Notes an agent's disk becoming full (it drains) or free again: then a pass places jobs there."""
        if inv.disk_full == (agent_id in self._disk_full):
            return
        self._agent_rows = None  # a heads-only pass reads the agents' rows (their inventories) again too
        if inv.disk_full:
            self._disk_full.add(agent_id)
            log.warning("agent %s is draining: %s", agent_id, draining_of(inv))
        else:
            self._disk_full.discard(agent_id)
            log.info("agent %s takes jobs again: its disk has %d MiB free", agent_id, inv.disk_free_bytes >> 20)
        self.kick(finished=False)

    def _insert_logs(
        self, logs: Sequence[agent_pb2.LogBatch], screen: LogScreen | None
    ) -> tuple[Sequence[agent_pb2.LogBatch], list[LogAck], list[StoredChunk]]:
        # Read on the DB thread straight from the agent's message: a big batch costs the event loop
        # nothing (heartbeats keep being answered), and no line becomes an object on the way.
        kept = logs if screen is None else screen(logs)
        stored: list[StoredChunk] = []
        return kept, (self.store.insert_logs(kept, stored) if kept else []), stored

    async def _hand_off(self, stored: Sequence[StoredChunk]) -> None:
        """Chunks just committed, to the followers of their runs, in the order they were stored."""
        await self._runs_of(c.job_id for c in stored)
        by_run: dict[str, list[StoredChunk]] = {}
        for c in stored:
            run_id = self._job_runs.get(c.job_id)
            if run_id is not None:
                by_run.setdefault(run_id, []).append(c)
        for run_id, chunks in by_run.items():
            if overflowed := self.watchers.stored(run_id, chunks):
                self.metrics.log_follower_overflows.inc(overflowed)

    async def _runs_of(self, job_ids: Iterable[str]) -> set[str]:
        ids = set(job_ids)
        missing = [j for j in ids if j not in self._job_runs]
        if missing:
            self._job_runs.update(await self.db(self.store.run_ids_of_jobs, missing))
        return {self._job_runs[j] for j in ids if j in self._job_runs}

    # ---- user requests -----------------------------------------------------------------------
    def enqueue_run(
        self,
        run_id: str,
        jobs: Sequence[tuple[str, JobSpec]],
        owner: str = "",
        priority: int = 0,
        submitted_at: int = 0,
        workflow: str = "",
        stored_at: int | None = None,
    ) -> None:
        """A run just stored joins the scheduling queue: its jobs' ids and specs, its owner, priority,
        submission time and workflow (for fair share and estimates); `stored_at`: the jobs' rows'
        `submitted_at` when not the run's (jobs a provider program added)."""
        self.queue.add_run(run_id, jobs, owner, priority, submitted_at, workflow, stored_at)
        for job_id, _ in jobs:
            self.waits.start(job_id)
        self.kick(finished=False)

    def seal_secret(self, value: str) -> bytes:
        """A secret's value as the store keeps it (encrypted)."""
        return self.secret_box.encrypt(value)

    def remember_secret(self, name: str, value: str, owner: str = TEAM) -> None:
        """A secret the store now holds: job hand-offs from now on carry it (to the owner's jobs only,
        for a personal one)."""
        self.secrets.setdefault(owner, {})[name] = value
        self._secrets_digests.clear()

    def forget_secret(self, name: str, owner: str = TEAM) -> None:
        self.secrets.get(owner, {}).pop(name, None)
        self._secrets_digests.clear()

    def forget_secrets_of(self, owner: str) -> None:
        self.secrets.pop(owner, None)
        self._secrets_digests.clear()

    def secrets_digest(self, owner: str) -> str:
        """The step cache's fingerprint of the secrets a job of `owner` gets (coordinator/cache.py)."""
        if (digest := self._secrets_digests.get(owner)) is None:
            digest = secrets_digest(self.secret_box.derive(b"dstack step cache"), self.secrets_for(owner))
            self._secrets_digests[owner] = digest
        return digest

    def secrets_for(self, owner: str) -> dict[str, str]:
        """What a job of `owner` gets: the team's secrets, overridden by the owner's personal ones of
        the same name; never another user's."""
        out = dict(self.secrets.get(TEAM, {}))
        if owner != TEAM:
            out.update(self.secrets.get(owner, {}))
        return out

    async def preempt(self, job_ids: Sequence[str], reason: str) -> int:
        """Preempts interruptible jobs on agents: each gets SIGTERM and the grace period, its artifacts
        are saved, and it is requeued as a new attempt that starts with its `mount: true` folders as
        saved (coordinator/lifecycle/attempts.py). Jobs not interruptible, not on an agent or already
        stopping are left alone; returns how many were asked to stop. The one entry point for
        preemption: policies (who is preempted for whom) call this."""
        orders = await self.db(self.store.request_preempt, list(job_ids), reason)
        for order in orders:
            log.info("job %s: preempted (%s)", order.wire_id, reason)
            self.hub.send(order.agent_id, agent_pb2.CoordinatorMessage(stops=[agent_pb2.StopJob(job_id=order.wire_id)]))
        if orders:
            self.watchers.notify_all()
        return len(orders)

    async def stop_run(self, run_name: str) -> None:
        on_agents = await self.db(self.store.request_stop, run_name)
        for job_id, agent_id in on_agents:
            self.hub.send(agent_id, agent_pb2.CoordinatorMessage(stops=[agent_pb2.StopJob(job_id=job_id)]))
        run = await self.db(self.store.run_by_name, run_name)
        self.queue.discard_run(run.id)
        self.watchers.notify([run.id])
        self.kick()


def _unbuildable(a: Assignment, e: Exception) -> str:
    """Why a placed job's assignment could not be built, in words its owner can act on."""
    try:
        common_pb2.JobSpec().ParseFromString(a.spec)
    except Exception:
        return "its stored spec could not be read (the database is damaged): it was never sent to an agent"
    try:
        common_pb2.CodeRef().ParseFromString(a.code)
    except Exception:
        return "its run's stored code could not be read (the database is damaged): it was never sent to an agent"
    return f"its assignment could not be built ({type(e).__name__}: {e}): it was never sent to an agent"
