"""The serving coordinator's GC policy (coordinator/gc_policy.py): what lives long leaves the collector's
sight, cyclic garbage is still reclaimed (at once if it was never frozen, at the thaw if it was), and
collections are timed. Structural properties, not speeds: a deep queue is not walked by a collection."""

from __future__ import annotations

import gc
import random
import sys
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.engine import Engine
from dstack.coordinator.gc_policy import GcMetrics, GcPolicy
from dstack.coordinator.model import JobSpec
from dstack.coordinator.planner import RESOURCES, Policy, WaitInfo, WaitInfos, plan
from dstack.coordinator.queue import Waiting, WaitingQueue
from dstack.coordinator.scheduler import AgentState, JobRequest
from dstack.coordinator.store import NewJob, Store
from dstack.protos.v1 import common_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Node:
    """A weak-referenceable object that can sit in a reference cycle."""

    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    """The test process's objects go back to the collector afterwards, whatever a test froze."""
    gc.unfreeze()
    gc.collect()  # earlier tests' garbage goes now, not in the middle of a count
    try:
        yield
    finally:
        gc.unfreeze()


def queue_of(n: int) -> WaitingQueue:
    q = WaitingQueue()
    q.add_run("r-1", [(f"j-{i}", JobSpec(encoded=b"", job_name=f"j-{i}", workflow="w")) for i in range(n)], owner="u")
    return q


def walked(kind: type) -> int:
    """How many objects of this type a full collection would walk (frozen ones are not)."""
    return sum(type(o) is kind for o in gc.get_objects())


def test_a_deep_queue_is_out_of_a_full_collections_sight_after_a_tick() -> None:
    before = walked(Waiting), walked(JobRequest)  # an earlier test's, not collected yet
    q = queue_of(10_000)
    assert (walked(Waiting), walked(JobRequest)) == (before[0] + 10_000, before[1] + 10_000)  # walked until now
    GcPolicy(clock=Clock()).tick()
    assert walked(Waiting) == 0 and walked(JobRequest) == 0
    assert len(q) == 10_000  # frozen objects are still in use
    later = queue_of(100)
    assert walked(Waiting) == 100  # newer objects are collected as usual until the next tick
    del later


def test_frozen_objects_are_still_freed_by_reference_counting() -> None:
    q = queue_of(1_000)
    GcPolicy(clock=Clock()).tick()
    frozen = gc.get_freeze_count()
    q.discard([f"j-{i}" for i in range(1_000)])
    del q
    assert gc.get_freeze_count() <= frozen - 2_000  # each job's `Waiting` and `JobRequest` were freed


def test_cyclic_garbage_made_before_a_tick_is_collected_by_it() -> None:
    dead = cycle()
    GcPolicy(clock=Clock()).tick()
    assert dead() is None


def test_cyclic_garbage_of_frozen_objects_waits_for_the_thaw_and_no_longer() -> None:
    clock = Clock()
    policy = GcPolicy(clock=clock, thaw_s=300, thaw_growth=0)  # every THAW_S, whatever memory did
    a = Node()
    a.other = Node()
    a.other.other = a
    alive = weakref.ref(a)
    policy.tick()  # alive now: frozen
    del a
    gc.collect()
    clock.now += 299
    policy.tick()
    assert alive() is not None  # the deferred part: frozen cyclic garbage is not walked by a collection
    clock.now += 1
    policy.tick()  # the thaw: every object collected once
    assert alive() is None
    clock.now += 10
    b = cycle()
    policy.tick()  # and not again before the next thaw: a tick walks only what is not frozen
    assert b() is None


def test_collections_are_timed_by_generation() -> None:
    registry = CollectorRegistry()
    metrics = GcMetrics(registry)
    gc.callbacks.append(metrics)
    try:
        gc.collect(0)
        gc.collect(2)
        GcPolicy(metrics, clock=Clock(), thaw_s=0, thaw_growth=0).tick()
    finally:
        gc.callbacks.remove(metrics)

    def value(name: str, **labels: str) -> float:
        v = registry.get_sample_value(name, labels)
        assert v is not None, (name, labels)
        return v

    assert value("dstack_gc_collection_seconds_count", generation="0") >= 1
    assert value("dstack_gc_collection_seconds_count", generation="2") >= 2
    assert value("dstack_gc_thaws_total") == 1
    assert value("dstack_gc_frozen_objects") > 1_000  # the test process: thousands of objects frozen


def test_a_full_pass_over_a_deep_queue_leaves_no_tracked_object_per_job_in_its_wait_info() -> None:
    """A full pass makes a `WaitInfo` per waiting job about every second: kept as objects, they were
    100,000 promotions per pass towards the next full collection."""
    queue = [JobRequest(job_id=f"j-{i}", gpu_count=1, owner="u", submitted_at=i) for i in range(5_000)]
    agents = [AgentState("a-1", "a-1", 8.0, 1 << 34, [], max_jobs=4)]  # no GPU: every job waits
    p = plan(queue, agents, [], Policy(now_ns=10**18))
    # Not tracked from the start, before any collection: a full collection during the pass has nothing
    # of them to walk (a dict of fresh tuples was tracked until a full collection untracked it).
    assert not any(gc.is_tracked(column) for column in p.info.columns())
    assert len(p.info) == 5_000 and p.info["j-7"].position == 8 and p.info["j-7"].reason
    merged = WaitInfos()
    merged["x"] = WaitInfo(1, RESOURCES, "waiting", 5)
    merged.merge(p.info)
    assert len(merged) == 5_001 and merged["x"] == WaitInfo(1, RESOURCES, "waiting", 5)
    assert merged["j-7"] == p.info["j-7"] and list(merged)[:2] == ["x", "j-0"]
    assert not any(gc.is_tracked(column) for column in merged.columns())
    del merged["x"]
    assert "x" not in merged and merged.get("x") is None and len(merged) == 5_000


@contextmanager
def hooked(policy: GcPolicy) -> Iterator[None]:
    gc.callbacks.append(policy.on_collection)
    try:
        yield
    finally:
        gc.callbacks.remove(policy.on_collection)


@contextmanager
def thresholds(*t: int) -> Iterator[None]:
    saved = gc.get_threshold()
    gc.set_threshold(*t)
    try:
        yield
    finally:
        gc.set_threshold(*saved)


def test_cpythons_own_full_collections_freeze_their_survivors_so_none_is_walked_twice() -> None:
    """Between ticks a fill promoted hundreds of thousands of objects, and each of CPython's full
    collections walked them all again: now each is walked by one full collection at most."""
    policy = GcPolicy(clock=Clock())
    full: list[int] = []  # how many `Waiting`s each full collection found to walk

    def census(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(walked(Waiting))

    kept = []
    # As in the coordinator, where start-up's objects are frozen before the first tick: CPython's full
    # collections then start again from a small old generation, whatever the size of this process.
    gc.freeze()
    policy.tick()
    with hooked(policy), thresholds(100, 2, 2):  # CPython's own collections, often, while the queue fills
        gc.callbacks.insert(0, census)
        try:
            for _ in range(20):
                kept.append(queue_of(500))
        finally:
            gc.callbacks.remove(census)
    assert sum(full) <= 1.2 * 20 * 500  # each job's `Waiting` walked by about one of them, not by each
    assert len(full) >= 5  # full collections did run, triggered by the allocations alone
    assert walked(Waiting) <= 500  # what is left unfrozen: at most the last queue, made since the last one
    assert sum(len(q) for q in kept) == 10_000


def test_a_cycle_frozen_by_a_full_collection_is_freed_at_the_next_thaw() -> None:
    clock = Clock()
    policy = GcPolicy(clock=clock, thaw_s=300, thaw_growth=0)
    with hooked(policy):
        a = Node()
        a.other = Node()
        a.other.other = a
        alive = weakref.ref(a)
        gc.collect()  # a full collection: `a` survives it and is frozen by the hook
        del a
        gc.collect()
        assert alive() is not None  # frozen cyclic garbage: left for the thaw
        clock.now += 300
        policy.tick()
    assert alive() is None


def test_a_census_holds_the_freezing() -> None:
    policy = GcPolicy(clock=Clock())
    with hooked(policy):
        with policy.hold():
            gc.collect()
            assert walked(Node) == 0 and gc.get_objects()  # counted, not frozen
        gc.collect()
    assert len(gc.get_objects()) < 100  # frozen once the census is over


class Blocks:
    def __init__(self) -> None:
        self.n = 100_000

    def __call__(self) -> int:
        return self.n


def thaws_after(policy: GcPolicy, clock: Clock, blocks: Blocks, steps: list[tuple[float, int]]) -> list[bool]:
    """Each step: the clock moves on, the allocator's live blocks become a value, and one tick runs."""
    out = []
    for dt, n in steps:
        a = Node()
        a.other = Node()
        a.other.other = a
        alive = weakref.ref(a)
        policy.tick()  # `a` frozen
        del a
        clock.now += dt
        blocks.n = n
        policy.tick()
        out.append(alive() is None)  # freed: this tick thawed
    return out


def test_a_thaw_is_put_off_while_memory_does_not_grow_and_no_longer_than_thaw_max() -> None:
    clock, blocks = Clock(), Blocks()
    policy = GcPolicy(clock=clock, thaw_s=300, thaw_growth=0.05, thaw_max_s=1800, live_blocks=blocks)
    gc.freeze()  # the ticks that do not thaw walk only the test's own objects, whatever this process holds
    thawed = thaws_after(
        policy,
        clock,
        blocks,
        [
            (299, 200_000),  # not due yet, however much memory grew
            (1, 104_000),  # due, but live blocks are under 5% above what the last thaw left: put off
            (299, 104_000),  # looked at again only one THAW_S later
            (1, 105_000),  # grown 5%: frozen cyclic garbage may be 5% of the heap, thawed
            (300, 105_000),  # flat since: put off ...
            (300, 105_000),
            (300, 90_000),
            (300, 100_000),
            (300, 105_000),
            (300, 105_000),  # ... until THAW_MAX_S after the last thaw
        ],
    )
    assert thawed == [False, False, False, True, False, False, False, False, False, True]


def test_frozen_cyclic_garbage_that_grows_the_allocators_live_blocks_is_thawed_at_the_next_check() -> None:
    """A soak in small, at the scale of this process's heap (the suite's workers hold millions of
    objects): each round leaves a frozen cycle holding 8% of the allocator's live blocks. With the real
    sys.getallocatedblocks(), the next due check sees the growth and thaws, though no round is
    THAW_MAX_S long: no such cycle outlives it, where with no thaw all four would be alive."""
    clock = Clock()
    policy = GcPolicy(clock=clock, thaw_s=300, thaw_growth=0.05, thaw_max_s=10**9)
    payload = int(0.08 * sys.getallocatedblocks())
    alive: list[weakref.ref[Node]] = []
    most = 0
    gc.freeze()
    for _ in range(4):
        a = Node()
        a.other = Node()
        a.other.other = a
        a.payload = [object() for _ in range(payload)]  # type: ignore[attr-defined]  # what the cycle holds
        alive.append(weakref.ref(a))
        policy.tick()  # frozen
        del a
        clock.now += 300
        policy.tick()
        alive = [r for r in alive if r() is not None]
        most = max(most, len(alive))
    assert most <= 1


def wide_unfrozen(at_least: int = 1_000) -> list[str]:
    """The containers a full collection would walk that follow this many references or more."""
    return [type(o).__qualname__ for o in gc.get_objects() if len(gc.get_referents(o)) >= at_least]


def test_a_heads_pass_gets_each_users_jobs_without_a_copy_of_the_list() -> None:
    """A heads-only pass copied each user's whole list (one reference per waiting job), and the copy
    lived through the pass on the DB thread, where CPython's full collections walked it."""
    q = queue_of(10_000)
    q.by_user()  # sorted and tidied as the first pass would
    gc.freeze()  # the queue is long-lived: frozen by the policy between passes
    assert wide_unfrozen() == []
    windows = q.by_user()
    assert wide_unfrozen() == []  # nothing as wide as the queue to walk while the pass runs
    assert [w.job_id for w in windows["u"]] == [f"j-{i}" for i in range(10_000)]
    q.discard([f"j-{i}" for i in range(100)])  # placed: they leave from the front
    later = q.by_user()["u"]
    assert len(later) == 9_900 and later[0].job_id == "j-100" and later[-1].job_id == "j-9999"
    assert wide_unfrozen() == []


def test_a_window_handed_to_a_pass_keeps_its_entries_whatever_the_queue_does_meanwhile() -> None:
    """The pass walks its windows on the DB thread while the event loop changes the queue: jobs come (in
    and out of a user's order), are placed from the front or leave from the middle, lists are sorted and
    tidied. A window must keep showing exactly what it showed when handed out, and every new one the
    live jobs in their user's order."""
    rng = random.Random(23)
    q = WaitingQueue()
    n = 0
    handed: list[tuple[dict[str, list[str]], dict[str, Sequence[Waiting]]]] = []
    for _ in range(400):
        op = rng.random()
        if op < 0.4:
            owner, priority = rng.choice("abc"), rng.choice((0, 0, 0, 1, 5))
            jobs = [
                (f"j-{n + k}", JobSpec(encoded=b"", job_name=f"j-{n + k}", workflow="w"))
                for k in range(rng.randint(1, 30))
            ]
            n += len(jobs)
            q.add_run(f"r-{n}", jobs, owner=owner, priority=priority, submitted_at=rng.randint(0, 50))
        elif op < 0.7:  # placed: the heads of a user's order
            for window in q.by_user().values():
                q.discard([w.job_id for w in list(window)[: rng.randint(0, 8)]])
        elif op < 0.85:  # stopped: anywhere
            waiting = [w.job_id for w in q.snapshot()]
            q.discard(rng.sample(waiting, min(len(waiting), rng.randint(0, 20))))
        else:
            windows = q.by_user()
            handed.append(({u: [w.job_id for w in ws] for u, ws in windows.items()}, windows))
            for user, window in windows.items():
                live = [w for w in window if q.live(w)]
                assert live == sorted(
                    (w for w in q.snapshot() if w.request.owner == user),
                    key=lambda w: (-w.request.priority, w.request.submitted_at, w.seq),
                )
        for seen, windows in handed[-10:]:
            for user, window in windows.items():
                assert [w.job_id for w in window] == seen[user]
                assert [window[i].job_id for i in range(len(window))] == seen[user]


def test_a_full_pass_plans_from_a_snapshot_that_keeps_no_entry_of_the_queue_but_those_it_may_mark(
    tmp_path: Path,
) -> None:
    """The queue's entries (a list as long as the queue) lived through the plan only to find the few
    entries still to be marked pending: now only those are kept."""
    config = CoordinatorConfig(
        state_dir=tmp_path, listen="127.0.0.1:0", storage_url="", admin_token="a", join_token="j"
    )
    store = Store(tmp_path / "coordinator.db")
    engine = Engine(config, store, db=None)  # type: ignore[arg-type]  # called on this thread
    spec = common_pb2.JobSpec(job_name="main", workflow="t", provider="bash", commands=["true"]).SerializeToString()
    for _ in range(50):
        store.create_run("admin", "t", b"", "", [], [NewJob("main", spec, 0, 0, 0, [])])
    for row in store.waiting_jobs():
        engine.queue.add_row(row)
    waiting = engine.queue.snapshot()
    engine.queue.mark_pending([w.job_id for w in waiting[:47]])
    snap = engine._info_snapshot(waiting, set())
    assert [w.job_id for w in snap.submitted] == [w.job_id for w in waiting[47:]]
    assert len(snap.queue) == 50  # what the planner needs: each job's request
    kept = [v for f in fields(snap) if isinstance(v := getattr(snap, f.name), list)]
    assert not any(w in lst for w in waiting[:47] for lst in kept)
