"""Runs the coordinator with every thread under cProfile (the DB thread does most of a pass's work,
and cProfile on its own sees only the thread that enabled it); at exit the threads' stats are merged
into PROFILE_OUT (a pstats file).

    PROFILE_OUT=/tmp/c.prof python -m bench.profiled --state-dir ... (the coordinator's own arguments)
    PROFILE_MODULE=dstack.agent PROFILE_OUT=/tmp/a-{pid}.prof python -m bench.profiled ...  (an agent; {pid}: its pid)
    python -m bench.drain --profile /tmp/c.prof            the drain bench's coordinator runs under it
    python -c "import pstats; pstats.Stats('/tmp/c.prof').sort_stats('tottime').print_stats(40)"

Each thread's profile counts that thread's CPU time (`time.thread_time`), not wall time: a thread
waiting on a queue, on epoll or on the disk costs nothing in it. gRPC's C-core threads are not seen.
cProfile roughly doubles the coordinator's CPU: read shares of the profile, not its absolute times.
"""

from __future__ import annotations

import atexit
import cProfile
import os
import pstats
import runpy
import sys
import threading
import time

_profiles: list[cProfile.Profile] = []
_lock = threading.Lock()


def _profiled_run(self: threading.Thread) -> None:
    prof = cProfile.Profile(time.thread_time)
    with _lock:
        _profiles.append(prof)
    prof.enable()
    try:
        _plain_run(self)
    finally:
        prof.disable()


def _dump(out: str) -> None:
    with _lock:
        profiles = list(_profiles)
    if os.environ.get("PROFILE_MAIN_OUT") and profiles:  # the event loop's thread alone, beside the merged file
        profiles[0].disable()
        pstats.Stats(profiles[0]).dump_stats(os.environ["PROFILE_MAIN_OUT"].replace("{pid}", str(os.getpid())))
    stats: pstats.Stats | None = None
    for prof in profiles:
        prof.disable()  # a daemon thread's profile is still enabled: its data so far is what is kept
        try:
            stats = pstats.Stats(prof) if stats is None else (stats.add(prof) or stats)
        except TypeError:  # a thread that recorded nothing
            continue
    if stats is not None:
        stats.dump_stats(out)


_plain_run = threading.Thread.run


def main() -> None:
    out = os.environ["PROFILE_OUT"].replace("{pid}", str(os.getpid()))
    module = os.environ.get("PROFILE_MODULE", "dstack.coordinator")
    threading.Thread.run = _profiled_run  # type: ignore[method-assign]
    main_prof = cProfile.Profile(time.thread_time)
    with _lock:
        _profiles.append(main_prof)
    atexit.register(_dump, out)
    args = sys.argv[1:]
    if args[:1] == [module]:  # bench._harness's agent_wrap: the module is named after the wrapper
        args = args[1:]
    sys.argv = [module, *args]
    main_prof.enable()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
