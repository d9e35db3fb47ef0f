"""Streaming a run's logs from a cursor, across the move of finished jobs' logs to the store.

A job's lines live in SQLite until coordinator/retention.py archives them (logs.jsonl.gz in the
object store, then the rows are deleted, then `logs_state` says so), and may later be deleted.
Each poll reads, in one call on the DB thread, the run's end, every job's `logs_state` and the
lines after the cursor: the archiver's switch runs on that same thread, so a poll sees a job
either wholly in the database or wholly archived. A job found archived is read from its archive
after the cursor, so a stream that meets the archiver mid-way still returns every line once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass

from dstack.coordinator.app.core import Core, run_by_name
from dstack.coordinator.artifacts import logs_key
from dstack.coordinator.model import LogLine, LogStream, RunView
from dstack.coordinator.retention import iter_log_archive
from dstack.coordinator.store.db import Store

LOG_BATCH = 5000
LOG_BATCH_BYTES = 4 << 20  # one response stays far below gRPC's message limit
IN_DATABASE, ARCHIVED, DELETED = 0, 1, 2
DELETED_NOTICE = "[dstack: the logs of this job were deleted by the retention policy]"


@dataclass(frozen=True)
class JobLines:
    job_name: str
    lines: list[LogLine]


@dataclass(frozen=True)
class LogChunk:
    """Lines of some jobs; `cursor` is the position after them: job name -> last seq sent."""

    jobs: list[JobLines]
    cursor: dict[str, int]
    finished_run: RunView | None = None


@dataclass(frozen=True)
class _Poll:
    finished: bool
    lines: list[JobLines]
    states: dict[str, int]  # job name -> logs_state


async def stream_logs(
    core: Core, run_name: str, follow: bool, after: Mapping[str, int] | None = None
) -> AsyncGenerator[LogChunk, None]:
    """Every line of the run after `after`; with `follow`, until the run has finished (the last
    chunk then carries the finished run)."""
    run = await core.read(run_by_name, run_name)
    run_id: str = run.id
    cursor: dict[str, int] = {k: v for k, v in (after or {}).items() if v > 0}
    done: set[str] = set()  # archived (or deleted) jobs whose lines have all been sent

    def poll(store: Store) -> _Poll:
        # The end first: every line of a job is stored before its end is.
        finished = store.run_by_id(run_id).finished_at is not None
        jobs = store.jobs_of_runs([run_id])[run_id]
        out: list[JobLines] = []
        budget = LOG_BATCH_BYTES
        for j in jobs:
            if j.logs_state != IN_DATABASE or budget <= 0:
                continue
            rows = store.read_logs(j.id, cursor.get(j.job_name, 0), LOG_BATCH, budget)
            budget -= sum(len(r.text) + 32 for r in rows)
            if rows:
                out.append(JobLines(j.job_name, rows))
        return _Poll(finished, out, {j.job_name: j.logs_state for j in jobs})

    while True:
        event = core.engine.watchers.event(run_id)
        p = await core.read(poll)
        moved = False
        for name, state in p.states.items():
            if state != IN_DATABASE and name not in done:
                async for chunk in _from_archive(core, run.name, name, state, cursor):
                    yield chunk
                done.add(name)
                moved = True
        if p.lines:
            for jl in p.lines:
                cursor[jl.job_name] = jl.lines[-1].seq
            yield LogChunk(p.lines, dict(cursor))
            continue
        if moved:
            continue  # read again: the run may have ended meanwhile
        if not follow:
            return
        if p.finished:
            yield LogChunk([], dict(cursor), finished_run=await core.run(run.name))
            return
        try:
            await asyncio.wait_for(event.wait(), timeout=1.0)
        except TimeoutError:
            pass


async def _from_archive(
    core: Core, run_name: str, job_name: str, state: int, cursor: dict[str, int]
) -> AsyncIterator[LogChunk]:
    after = cursor.get(job_name, 0)
    if state == DELETED:
        if after < 1:
            cursor[job_name] = 1
            notice = LogLine(seq=1, stream=LogStream.SYSTEM, time_ns=0, text=DELETED_NOTICE)
            yield LogChunk([JobLines(job_name, [notice])], dict(cursor))
        return
    f = await asyncio.to_thread(core.objects.open_read, logs_key(run_name, job_name))
    unsent = (ln for ln in iter_log_archive(f) if ln.seq > after)
    try:
        # Batch by batch on a worker thread: reading and unzipping a long archive must not stall the loop.
        while part := await asyncio.to_thread(lambda: list(itertools.islice(unsent, LOG_BATCH))):
            cursor[job_name] = part[-1].seq
            yield LogChunk([JobLines(job_name, part)], dict(cursor))
    finally:
        with contextlib.suppress(ValueError):  # a batch still being read, if the stream was cancelled
            unsent.close()
        f.close()
