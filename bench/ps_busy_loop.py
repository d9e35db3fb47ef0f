"""`dstack ps` behind a busy event loop: what a listing waits for each time it needs the coordinator's loop.

Under issue 16's load (5,000 agents' messages, passes, collections) the coordinator's event loop is rarely
free, and a ListRuns waits for it each time it comes back to it (the call's arrival, a thread's result). Here
that is made steady and the same for every tree: an in-process coordinator (tests/inproc) holds ACTIVE queued
runs and 3 finished ones, and a task on its loop spins SLICE_MS at a time, yielding between slices. The CLI's
client (`Client.list_runs_head`, what `dstack ps` calls: the newest 100 and the latest finished) is timed
ROUNDS times on a warm connection from a thread of the same process. Run it once per tree, alternating:

    for t in MAIN_TREE .; do (cd $t && PYTHONPATH=$t python -m bench.ps_busy_loop 10 20 300); done

(a tree that predates this file: `PYTHONPATH=$t python /path/to/bench/ps_busy_loop.py`).
Printed: the listing's wall p50/p90 and the number of ListRuns calls it made.
Usage: python -m bench.ps_busy_loop [SLICE_MS] [ROUNDS] [ACTIVE]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from dstack.cli.client import Client
from dstack.cli.home import Endpoint
from dstack.coordinator.store.runs import NewJob
from dstack.protos.v1 import client_pb2
from tests.inproc.factories import ADMIN, coordinator, job_spec, submit_run

T = TypeVar("T")
FINISHED = 3


class CountingClient(Client):
    calls = 0

    def _call(self, fn: Callable[..., T], request: Any, **kw: Any) -> T:
        self.calls += 1
        return super()._call(fn, request, **kw)


async def measure(slice_ms: float, rounds: int, active: int) -> tuple[list[float], int]:
    async with coordinator(Path(tempfile.mkdtemp()), max_queued_per_user=0, max_submissions_per_minute=0) as h:
        done = [await submit_run(h) for _ in range(FINISHED)]
        for r in done:
            await h.client.StopRun(client_pb2.StopRunRequest(name=r.name), metadata=h.meta)
        engine = h.coordinator.engine
        spec = job_spec().SerializeToString()

        def insert() -> None:  # straight into the store: they only need to be listed
            job = NewJob(job_name="main", spec=spec, cpu=1.0, memory=0, gpu_count=0, depends_on=[])
            for _ in range(active):
                engine.store.create_run("admin", "w", b"", "", [], [job])

        await engine.db(insert)
        busy = True

        async def hog() -> None:
            while busy:
                end = time.perf_counter() + slice_ms / 1e3
                while time.perf_counter() < end:
                    pass
                await asyncio.sleep(0)

        task = asyncio.create_task(hog())

        def listings() -> tuple[list[float], int]:
            client = CountingClient(Endpoint(address=h.address, token=ADMIN, insecure=True))
            try:
                client.list_runs_head(False, 10)  # the connection made, the token cached
                walls, calls = [], 0
                for _ in range(rounds):
                    client.calls = 0
                    t = time.perf_counter()
                    runs, more = client.list_runs_head(False, 100)
                    walls.append((time.perf_counter() - t) * 1e3)
                    calls = client.calls
                    assert more and len(runs) == 100 + FINISHED, len(runs)
                return walls, calls
            finally:
                client.close()

        try:
            return await asyncio.to_thread(listings)
        finally:
            busy = False
            await task


def main() -> None:
    slice_ms = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    active = int(sys.argv[3]) if len(sys.argv) > 3 else 300
    walls, calls = asyncio.run(measure(slice_ms, rounds, active))
    p90 = statistics.quantiles(walls, n=10)[-1]
    print(
        f"loop busy in {slice_ms:g} ms slices, {active} queued runs: `dstack ps`'s listing wall p50"
        f" {statistics.median(walls):.1f} ms, p90 {p90:.1f} ms; {calls} ListRuns call(s) each"
    )


if __name__ == "__main__":
    main()
