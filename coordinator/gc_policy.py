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

Collections are timed per generation into `dstack_gc_collection_seconds`, with the frozen count and the
thaws, on the coordinator's /metrics.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)

REFREEZE_S = 10.0
THAW_S = 300.0
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
            "Objects moved out of the collector's sight at the last freeze (coordinator/gc_policy.py)",
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
    ) -> None:
        self.metrics = metrics
        self.refreeze_s = refreeze_s
        self.thaw_s = thaw_s
        self.clock = clock
        self._thaw_at = clock() + thaw_s

    def tick(self) -> None:
        """Collect what is not frozen and freeze the survivors; every `thaw_s`, everything first."""
        now = self.clock()
        if now >= self._thaw_at:
            self._thaw_at = now + self.thaw_s
            began = time.perf_counter()
            gc.unfreeze()
            gc.collect()
            took = time.perf_counter() - began
            if self.metrics is not None:
                self.metrics.thaws.inc()
            if took > SLOW_THAW_S:
                log.info("garbage collection: a full collection of every object took %.1f s", took)
        else:
            gc.collect()  # only what is not frozen: the objects made since the last freeze
        gc.freeze()
        if self.metrics is not None:
            self.metrics.frozen.set(gc.get_freeze_count())

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.refreeze_s)
            try:
                self.tick()
            except Exception:  # never fatal: the collector's defaults go on working
                log.exception("garbage collection policy: a tick failed")


def install(registry: CollectorRegistry) -> asyncio.Task[None]:
    """In the serving process, on its event loop: freezes what start-up made at once, then ticks."""
    metrics = GcMetrics(registry)
    gc.callbacks.append(metrics)
    policy = GcPolicy(metrics)
    gc.freeze()
    metrics.frozen.set(gc.get_freeze_count())
    return asyncio.get_running_loop().create_task(policy.run(), name="gc policy")
