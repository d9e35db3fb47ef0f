"""The coordinator's garbage-collector thresholds.

CPython's defaults (700, 10, 10) suit short scripts. A coordinator with thousands of agent streams and a
deep queue keeps millions of objects alive, and many short-lived ones (a request, its protobuf messages,
a row) live across an await or two: long enough to be promoted past the young generations. Each
promotion counts towards the next full collection, which walks every object the process holds. Measured
with 5,000 simulated agents and 100,000 queued jobs on the shared 2-core machine (bench/README.md, "Scale
shortcuts"): with the defaults a full collection ran every 3-4 s, took 0.5-2.5 s (once 6.8 s) and
collected nothing; the event loop stopped meanwhile, so agents' messages waited unread. A paired
full-size A/B (bench/README.md) filled the queue at 327 vs 161 runs/s with 434 vs 630 s of coordinator
CPU, no full collection over 0.1 s (against 230, 285 s in all) and RSS within 2%.

A young generation of GEN0 allocations promotes only what outlives tens of thousands of allocations, and
a full collection waits for GEN2 middle ones (and CPython's own rule: a quarter more long-lived objects
than at the last one). Cyclic garbage is still collected; it waits longer. Only `python -m
dstack.coordinator` sets these (main), not a process that imports the coordinator.
"""

from __future__ import annotations

import gc

GEN0 = 50_000
GEN1 = 10
GEN2 = 100


def tune_gc() -> None:
    gc.set_threshold(GEN0, GEN1, GEN2)
