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

How the soak's +5.5 MiB/h (issue 16) was found: `Waiting` and `JobRequest` counted +170 a minute at
3 runs/s while the queue stayed shallow (coordinator/queue.py kept every job that ever waited).
"""

from __future__ import annotations

import collections
import ctypes
import gc
import json
import os
import runpy
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


def main() -> None:
    if sys.argv[1:2] == ["--report"]:
        report(Path(sys.argv[2]))
        return
    out = Path(os.environ["MEMPROBE_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    period = float(os.environ.get("MEMPROBE_PERIOD", "60"))
    threading.Thread(target=_sampler, args=(out, period), name="memprobe", daemon=True).start()
    sys.argv = ["dstack.coordinator", *sys.argv[1:]]
    runpy.run_module("dstack.coordinator", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
