"""The serving coordinator's garbage-collection policy: what lives long is frozen, and thawed rarely.

Why (issue 16): at 5,000 agents and 100,000 queued jobs the coordinator holds about a million objects
the collector tracks (bench/gc_census.py: ~105 per agent session, the gRPC stream's and its tasks'
coroutines, futures and queues; ~3 per queued job, `Waiting`, `JobRequest`, `WaitInfo`, ~30 references).
CPython 3.11 runs a full collection each time the objects promoted to the old generation since the
last one reach a quarter of it, and a busy server promotes many objects that die soon after (a message
waiting on the DB thread outlives two young collections). With CPython's thresholds a full collection
ran every 3-4 s, took 0.5-2.5 s with the event loop stopped, and found nearly nothing. Raising the
thresholds removed those stalls but let a soak grow (bench/README.md, "Scale shortcuts").

What this does instead, from the serving process only (`python -m dstack.coordinator`, not a process
that imports the coordinator):
- every REFREEZE_S: one collection of what is not frozen (what was made since the last freeze, so it
  costs what that is, not the heap), then `gc.freeze()`: whatever survived is moved out of the
  collector's sight, so CPython's own collections, full ones too, walk only newer objects;
- every THAW_S: `gc.unfreeze()`, one full collection of everything, and freeze again. A frozen object is
  still freed as soon as nothing refers to it; what freezing defers is only cyclic garbage made of frozen
  objects (an agent session that ended, a job's state): it is reclaimed here, so memory is bounded by
  THAW_S of that garbage (bench.soak shows it flat), at the price of one walk of the whole heap per
  THAW_S instead of one every few seconds.

Two refinements (issue 16, after a full-size fill still saw ~0.6 s full collections):
- CPython's own full collections freeze their survivors at once (a gc.callbacks hook on their "stop"):
  between ticks a busy fill promotes hundreds of thousands of objects, and each full collection walked
  all of them again until the tick froze them. Now each survivor is walked by at most one full
  collection before it is frozen, so one costs what was promoted since the previous one (CPython runs one
  per ten gen1 collections, ~70,000 net allocations), not since the tick.
- A thaw is due every THAW_S only if memory grew: when the object allocator's live blocks
  (sys.getallocatedblocks(), a walk of its pools, not of the objects) are not THAW_GROWTH above what the
  last thaw left, frozen cyclic garbage (which only grows that count) is under THAW_GROWTH of the live
  heap, and the walk of the whole heap is put off, up to THAW_MAX_S. A growing heap (a fill, or garbage)
  is thawed every THAW_S as before, so memory stays bounded by what the last thaw left plus THAW_GROWTH.

Collections are timed per generation into `dstack_gc_collection_seconds`, with the frozen count (taken at
each thaw: counting the frozen objects walks them all) and the thaws, on the coordinator's /metrics.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)

REFREEZE_S = 10.0
THAW_S = 300.0  # how often a thaw is considered
THAW_GROWTH = 0.05  # ... and done only if the live blocks grew this much since the last one
THAW_MAX_S = 1800.0  # ... or this long has passed
GC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SLOW_THAW_S = 1.0  # a thaw's full collection longer than this is logged


class GcMetrics:
    """The collector's work on the coordinator's /metrics: every collection timed, by generation."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.collections = Histogram(
            "dstack_gc_collection_seconds",
            "How long one garbage collection took (the event loop stands still meanwhile), by generation"
            " (2: a full collection of what is not frozen, the policy's thaws included)",
            ["generation"],
            buckets=GC_BUCKETS,
            registry=registry,
        )
        self.frozen = Gauge(
            "dstack_gc_frozen_objects",
            "Objects out of the collector's sight, counted at start-up and at each thaw (coordinator/gc_policy.py)",
            registry=registry,
        )
        self.thaws = Counter(
            "dstack_gc_thaws",
            "Full collections of every object, frozen ones included (one per THAW_S)",
            registry=registry,
        )
        # Made now, not in the hook: `labels` takes a lock to add a child, and a collection triggered
        # while that lock is held would then wait for itself.
        self._by_generation = [self.collections.labels(str(g)) for g in range(3)]
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        """A gc.callbacks hook."""
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self._by_generation[info["generation"]].observe(time.perf_counter() - self._began)


class GcPolicy:
    def __init__(
        self,
        metrics: GcMetrics | None = None,
        refreeze_s: float = REFREEZE_S,
        thaw_s: float = THAW_S,
        clock: Callable[[], float] = time.monotonic,
        thaw_growth: float = THAW_GROWTH,
        thaw_max_s: float = THAW_MAX_S,
        live_blocks: Callable[[], int] = sys.getallocatedblocks,
    ) -> None:
        self.metrics = metrics
        self.refreeze_s = refreeze_s
        self.thaw_s = thaw_s
        self.thaw_growth = thaw_growth
        self.thaw_max_s = thaw_max_s
        self.clock = clock
        self.live_blocks = live_blocks
        self.held = 0  # > 0: collections do not freeze (a census counting what a collection walks)
        self._thawed_at = clock()
        self._thaw_at = self._thawed_at + thaw_s
        self._blocks_after_thaw = live_blocks()

    def on_collection(self, phase: str, info: dict[str, Any]) -> None:
        """A gc.callbacks hook: the survivors of a full collection are frozen at once, so no later full
        collection walks them again before a thaw. Safe here: the collection is over, and `gc.freeze()`
        only splices the generations' lists (CPython ignores a collection asked for from a callback)."""
        if phase == "stop" and info["generation"] == 2 and not self.held:
            gc.freeze()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Collections inside do not freeze what survives them (bench/memprobe.py's census counts it)."""
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1

    def thaw_due(self, now: float) -> bool:
        if now < self._thaw_at:
            return False
        if now - self._thawed_at >= self.thaw_max_s:
            return True
        grew = self.thaw_growth <= 0 or self.live_blocks() >= self._blocks_after_thaw * (1 + self.thaw_growth)
        if not grew:
            self._thaw_at = now + self.thaw_s  # looked at again one THAW_S later
        return grew

    def tick(self) -> None:
        """Collect what is not frozen and freeze the survivors; when a thaw is due, everything first."""
        now = self.clock()
        if self.thaw_due(now):
            self._thawed_at, self._thaw_at = now, now + self.thaw_s
            began = time.perf_counter()
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            took = time.perf_counter() - began
            self._blocks_after_thaw = self.live_blocks()
            if self.metrics is not None:
                self.metrics.thaws.inc()
                self.metrics.frozen.set(gc.get_freeze_count())  # a walk of them all: once per thaw only
            if took > SLOW_THAW_S:
                log.info("garbage collection: a full collection of every object took %.1f s", took)
        else:
            gc.collect()  # only what is not frozen: the objects made since the last freeze
            gc.freeze()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.refreeze_s)
            try:
                self.tick()
            except Exception:  # never fatal: the collector's defaults go on working
                log.exception("garbage collection policy: a tick failed")


_installed: GcPolicy | None = None


def installed() -> GcPolicy | None:
    """The serving process's policy (None in any other process)."""
    return _installed


def install(registry: CollectorRegistry) -> asyncio.Task[None]:
    """In the serving process, on its event loop: freezes what start-up made at once, then ticks."""
    global _installed
    metrics = GcMetrics(registry)
    gc.callbacks.append(metrics)
    policy = _installed = GcPolicy(metrics)
    gc.callbacks.append(policy.on_collection)
    gc.freeze()
    metrics.frozen.set(gc.get_freeze_count())
    return asyncio.get_running_loop().create_task(policy.run(), name="gc policy")
