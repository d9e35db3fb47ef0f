"""Where a coordinator's memory goes: run it with a sampler thread, then read what grew.

    python -m bench.soak --probe DIR ...       the soak's coordinator runs under this module
    python -m bench.memprobe --report DIR      the samples, and the object types that grew

As a launcher (`python -m bench.memprobe COORDINATOR ARGS...`, MEMPROBE_OUT=DIR) it starts
`dstack.coordinator` in this process, and every MEMPROBE_PERIOD seconds (default 60) appends to
DIR/samples.jsonl: RSS split into anonymous and file-backed pages (code paged in is bounded; a leak is
anonymous), SQLite's own heap (its page caches, `sqlite3_status64`), glibc malloc's bytes in use and
free-but-kept, and every third sample the count of each type of object the garbage collector tracks.
With PYTHONTRACEMALLOC=N set, every fifth sample also dumps a tracemalloc snapshot (snapNNN.tm;
compare two with `Snapshot.compare_to`): slow, use it for short runs.

With MEMPROBE_GC=1 it also logs the collector (bench/gc_census.py reads it): every collection's
generation and duration, summed per generation, and the ones over 0.1 s one by one, in DIR/gc.json
(rewritten at most once a second); and on SIGUSR1 it writes DIR/census-N.json: the tracked objects by
type (frozen ones, gc.freeze(), are not walked by a collection and are left out) and how long a full
collection takes at that moment. With MEMPROBE_GC_CENSUS=K[,SKIP] as well, K of CPython's own full
collections, after the first SKIP, are looked at from their "start" (before the clock starts): what each is
about to walk, by type and by references followed, and its widest containers with what holds them, with
its CPU time, in DIR/full-N.json (MEMPROBE_CENSUS_OUT=DIR2: there instead; a bench's DIR is removed).

How the soak's +5.5 MiB/h (issue 16) was found: `Waiting` and `JobRequest` counted +170 a minute at
3 runs/s while the queue stayed shallow (coordinator/queue.py kept every job that ever waited).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import json
import os
import runpy
import signal
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

TYPES_EVERY = 3  # samples between object counts (a walk of every tracked object)
SNAPSHOT_EVERY = 5  # samples between tracemalloc snapshots, when tracing


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _sqlite_memory() -> int:
    """Bytes SQLite has allocated (all connections of the process: page caches, statements, schema)."""
    lib = ctypes.CDLL("libsqlite3.so.0")  # the one Python's _sqlite3 links to: its counters are shared
    cur, high = ctypes.c_int64(), ctypes.c_int64()
    lib.sqlite3_status64(0, ctypes.byref(cur), ctypes.byref(high), 0)  # SQLITE_STATUS_MEMORY_USED
    return cur.value


def _rss() -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out


def sample(i: int, t0: float, out: Path) -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    mi = libc.mallinfo2()
    row: dict[str, Any] = {
        "i": i,
        "minute": (time.monotonic() - t0) / 60,
        **_rss(),
        "sqlite": _sqlite_memory(),
        "malloc_in_use": mi.uordblks + mi.hblkhd,
        "malloc_free_kept": mi.fordblks,
        "threads": threading.active_count(),
    }
    if i % TYPES_EVERY == 0:
        row["types"] = collections.Counter(type(o).__name__ for o in gc.get_objects()).most_common(60)
    if tracemalloc.is_tracing():
        row["traced"] = tracemalloc.get_traced_memory()[0]
        if i % SNAPSHOT_EVERY == 0:
            tracemalloc.take_snapshot().dump(str(out / f"snap{i:03d}.tm"))
    with (out / "samples.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def _sampler(out: Path, period: float) -> None:
    t0, i = time.monotonic(), 0
    while True:
        try:
            sample(i, t0, out)
        except Exception as e:  # a probe that fails must not take the coordinator down
            with (out / "errors.txt").open("a") as f:
                f.write(f"{e!r}\n")
        i += 1
        time.sleep(period)


def report(out: Path) -> None:
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    mib = 1 << 20
    print("  min   RSS  anon  file  sqlite  malloc used/kept  (MiB)")
    for r in rows:
        print(
            f"{r['minute']:5.1f} {r.get('VmRSS', 0) / mib:5.1f} {r.get('RssAnon', 0) / mib:5.1f}"
            f" {r.get('RssFile', 0) / mib:5.1f} {r['sqlite'] / mib:7.2f} {r['malloc_in_use'] / mib:6.1f}"
            f" / {r['malloc_free_kept'] / mib:4.1f}"
        )
    counted = [r for r in rows if "types" in r]
    if len(counted) < 3:
        return
    mid, last = counted[len(counted) // 2], counted[-1]
    before, after = dict(mid["types"]), dict(last["types"])
    grew = sorted(((after[t] - before.get(t, 0), t) for t in after), reverse=True)[:10]
    print(f"objects that grew from minute {mid['minute']:.0f} to {last['minute']:.0f} (type: +count, now):")
    for n, t in grew:
        if n > 0:
            print(f"  {t}: +{n}, {after[t]}")


class GcLog:
    """Every collection's generation and duration (gc.callbacks), summed per generation."""

    SLOW_S = 0.1

    def __init__(self, out: Path) -> None:
        self.out = out
        self.began = 0.0
        self.began_cpu = 0.0
        self.count = [0, 0, 0]
        self.cpu_s = [0.0, 0.0, 0.0]  # the collecting thread's CPU time: what a loaded machine does not inflate
        self.total_s = [0.0, 0.0, 0.0]
        self.longest_s = [0.0, 0.0, 0.0]
        self.collected = [0, 0, 0]
        self.slow: list[tuple[float, int, float, int]] = []  # (seconds since start, generation, s, collected)
        self.t0 = time.monotonic()
        self.written = 0.0
        self.paused = False  # the census's own collections are not the process's
        # MEMPROBE_GC_CENSUS=K[,SKIP]: what K of CPython's own full collections walk, taken at their start
        # after SKIP of them (start-up's), each with its CPU time, in DIR/full-N.json (or MEMPROBE_CENSUS_OUT).
        k, _, skip = os.environ.get("MEMPROBE_GC_CENSUS", "0").partition(",")
        self.censuses_left, self.census_skip, self.full_seen = int(k), int(skip or 0), 0
        self.pending_census: dict[str, Any] | None = None
        self.censuses_taken = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if self.paused:
            return
        if phase == "start":
            if info["generation"] == 2 and self.censuses_left > 0:
                self.full_seen += 1
                if self.full_seen > self.census_skip:
                    self.censuses_left -= 1
                    self.pending_census = walk_census()  # before the clock starts: not the collection's time
            self.began, self.began_cpu = time.perf_counter(), time.thread_time()
            return
        took, gen = time.perf_counter() - self.began, info["generation"]
        self.cpu_s[gen] += time.thread_time() - self.began_cpu
        self.count[gen] += 1
        self.total_s[gen] += took
        self.longest_s[gen] = max(self.longest_s[gen], took)
        self.collected[gen] += info["collected"]
        if self.pending_census is not None and gen == 2:
            row, self.pending_census = self.pending_census, None
            row.update(cpu_s=time.thread_time() - self.began_cpu, wall_s=took, collected=info["collected"])
            row["thread"] = threading.current_thread().name
            where = Path(os.environ.get("MEMPROBE_CENSUS_OUT", self.out))  # a bench's DIR goes with it
            (where / f"full-{self.censuses_taken}.json").write_text(json.dumps(row))
            self.censuses_taken += 1
        if took > self.SLOW_S:
            self.slow.append((round(time.monotonic() - self.t0, 1), gen, round(took, 3), info["collected"]))
        now = time.monotonic()
        if now - self.written > 1.0:  # not per collection: a young one is sub-millisecond
            self.written = now
            self.write()

    def write(self) -> None:
        row = {
            "count": self.count,
            "total_s": self.total_s,
            "cpu_s": self.cpu_s,
            "longest_s": self.longest_s,
            "collected": self.collected,
            "slow": self.slow,
            "threshold": gc.get_threshold(),
        }
        tmp = self.out / "gc.json.tmp"
        tmp.write_text(json.dumps(row))
        tmp.replace(self.out / "gc.json")


def _owner(o: object) -> str:
    """A short name for a container: its type, and for a frame, a function or a cell, the code it belongs to."""
    name = type(o).__qualname__
    code = getattr(o, "f_code", None) or getattr(o, "__code__", None)
    if code is not None:
        return f"{name} {code.co_qualname}"
    return name


def walk_census(wide: int = 1000, top: int = 12) -> dict[str, Any]:
    """What the full collection about to run walks (every generation; frozen objects are not walked), by
    type and by references followed, and the widest containers with what holds them. Taken from a
    gc.callbacks "start" hook, where a collection cannot start: it allocates nothing that outlives it."""
    t0 = time.perf_counter()
    sizes = [len(gc.get_objects(generation=g)) for g in range(3)]
    objects = gc.get_objects()
    types: collections.Counter[str] = collections.Counter()
    refs: collections.Counter[str] = collections.Counter()
    widest: list[tuple[int, int]] = []  # (references, index in objects)
    for i, o in enumerate(objects):
        name = type(o).__qualname__
        k = len(gc.get_referents(o))
        types[name] += 1
        refs[name] += k
        if k > wide:
            widest.append((k, i))
    widest.sort(reverse=True)
    described = []
    for k, i in widest[:top]:
        o = objects[i]
        items = (
            list(o.values())[:3]
            if isinstance(o, dict)
            else list(o)[:3]
            if isinstance(o, list | tuple | set | frozenset)
            else []
        )
        keys = list(o)[:3] if isinstance(o, dict) else []
        held_by = [_owner(r) for r in gc.get_referrers(o) if r is not objects][:4]
        described.append(
            {
                "references": k,
                "type": type(o).__qualname__,
                "items": [type(x).__qualname__ for x in items],
                "keys": [repr(x)[:40] for x in keys],
                "held_by": held_by,
            }
        )
    del objects
    return {
        "generations": sizes,
        "tracked": sum(types.values()),
        "references": sum(refs.values()),
        "types": types.most_common(25),
        "references_by_type": refs.most_common(25),
        "widest": described,
        "census_s": time.perf_counter() - t0,
    }


def census(out: Path, n: int) -> None:
    """The tracked objects by type once cyclic garbage is gone, and how long a full collection of them
    takes (it runs in the signal handler, on the event loop's thread, as a collection triggered there would)."""
    collected = gc.collect(2)
    objects = gc.get_objects()
    types = collections.Counter(type(o).__qualname__ for o in objects)
    # A collection's cost is the references it follows, not the objects: one dict of 100,000 entries is
    # one object and 200,000 references.
    refs: collections.Counter[str] = collections.Counter()
    widest: list[tuple[int, str]] = []
    for o in objects:
        k = len(gc.get_referents(o))
        refs[type(o).__qualname__] += k
        if k > 1000:
            widest.append((k, type(o).__qualname__))
    del objects
    widest.sort(reverse=True)
    took = []
    for _ in range(3):
        t0 = time.perf_counter()
        gc.collect(2)
        took.append(time.perf_counter() - t0)
    row = {
        "tracked": sum(types.values()),
        "frozen": gc.get_freeze_count(),
        "full_collection_s": sorted(took)[1],
        "collected": collected,
        "types": types.most_common(80),
        "references": sum(refs.values()),
        "references_by_type": refs.most_common(30),
        "widest": widest[:30],
        "rss": _rss(),
    }
    (out / f"census-{n}.json").write_text(json.dumps(row))


def _gc_probe(out: Path) -> None:
    log = GcLog(out)
    gc.callbacks.append(log)
    taken = [0]

    def on_signal(signum: int, frame: object) -> None:
        from dstack.coordinator import gc_policy  # imported by the coordinator by now

        log.write()
        log.paused = True
        policy = gc_policy.installed()
        try:
            with policy.hold() if policy is not None else contextlib.nullcontext():  # counted, not frozen
                census(out, taken[0])
        finally:
            log.paused = False
        taken[0] += 1

    signal.signal(signal.SIGUSR1, on_signal)


def main() -> None:
    if sys.argv[1:2] == ["--report"]:
        report(Path(sys.argv[2]))
        return
    out = Path(os.environ["MEMPROBE_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    period = float(os.environ.get("MEMPROBE_PERIOD", "60"))  # 0: no sampler
    if os.environ.get("MEMPROBE_GC"):
        _gc_probe(out)
    if period > 0:
        threading.Thread(target=_sampler, args=(out, period), name="memprobe", daemon=True).start()
    sys.argv = ["dstack.coordinator", *sys.argv[1:]]
    runpy.run_module("dstack.coordinator", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
