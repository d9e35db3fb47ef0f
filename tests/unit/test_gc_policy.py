"""The serving coordinator's GC policy (coordinator/gc_policy.py): what lives long leaves the collector's
sight, cyclic garbage is still reclaimed (at once if it was never frozen, at the thaw if it was), and
collections are timed. Structural properties, not speeds: a deep queue is not walked by a collection."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from dstack.coordinator.gc_policy import GcMetrics, GcPolicy
from dstack.coordinator.model import JobSpec
from dstack.coordinator.planner import RESOURCES, Policy, WaitInfo, WaitInfos, plan
from dstack.coordinator.queue import Waiting, WaitingQueue
from dstack.coordinator.scheduler import AgentState, JobRequest


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
    policy = GcPolicy(clock=clock, thaw_s=300)
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
        GcPolicy(metrics, clock=Clock(), thaw_s=0).tick()
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
    assert len(p.info) == 5_000 and p.info["j-7"].position == 8 and p.info["j-7"].reason
    gc.collect()
    rows = p.info._rows
    assert not gc.is_tracked(rows) and not any(gc.is_tracked(t) for t in rows.values())
    merged = WaitInfos()
    merged["x"] = WaitInfo(1, RESOURCES, "waiting", 5)
    merged.merge(p.info)
    gc.collect()
    assert len(merged) == 5_001 and merged["x"] == WaitInfo(1, RESOURCES, "waiting", 5)
    assert not gc.is_tracked(merged._rows)
    del merged["x"]
    assert "x" not in merged and merged.get("x") is None
