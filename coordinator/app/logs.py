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
from dstack.coordinator.store.logs import body_of, is_blocks, lines_body, lines_of

LOG_BATCH = 5000
LOG_BATCH_BYTES = 3 << 20  # one response (whole chunks, within this) stays below gRPC's 4 MiB default limit
IN_DATABASE, ARCHIVED, DELETED = 0, 1, 2
# A follower wakes when its run's lines or state change (engine.RunWatchers, set once a chunk is stored);
# it also reads again after this long without a wake-up, in case a change came some other way.
FOLLOW_RECHECK_S = 1.0
DELETED_NOTICE = "[dstack: the logs of this job were deleted by the retention policy]"


class JobLines:
    """Lines of one job: decoded (`lines`), or as the store keeps them (`body`: a serialized list of
    dstack.v1.LogLine that a gRPC response takes as it is, no object per line), each made from the
    other on demand."""

    def __init__(self, job_name: str, lines: list[LogLine] | None = None, body: bytes | None = None) -> None:
        assert lines is not None or body is not None
        self.job_name = job_name
        self._lines = lines
        self._body = body

    @property
    def lines(self) -> list[LogLine]:
        if self._lines is None:
            assert self._body is not None
            self._lines = lines_of(self._body)
        return self._lines

    @property
    def body(self) -> bytes:
        if self._body is None:
            assert self._lines is not None
            self._body = body_of(self._lines)
        return self._body


@dataclass(frozen=True)
class LogChunk:
    """Lines of some jobs; `cursor` is the position after them: job name -> last seq sent."""

    jobs: list[JobLines]
    cursor: dict[str, int]
    finished_run: RunView | None = None


@dataclass(frozen=True)
class _Poll:
    finished: bool
    lines: list[tuple[JobLines, int]]  # with the seq of each job's last line
    states: dict[str, int]  # job name -> logs_state


async def stream_logs(
    core: Core, run_name: str, follow: bool, after: Mapping[str, int] | None = None, blocks: bool = False
) -> AsyncGenerator[LogChunk, None]:
    """Every line of the run after `after`; with `follow`, until the run has finished (the last
    chunk then carries the finished run). A JobLines' body may hold LogBlocks only if `blocks` (the
    client reads them: StreamLogsRequest.blocks)."""
    run = await core.read(run_by_name, run_name)
    run_id: str = run.id
    cursor: dict[str, int] = {k: v for k, v in (after or {}).items() if v > 0}
    done: set[str] = set()  # archived (or deleted) jobs whose lines have all been sent

    def poll(store: Store) -> _Poll:
        # The end first: every line of a job is stored before its end is.
        finished = store.run_by_id(run_id).finished_at is not None
        jobs = store.jobs_of_runs([run_id])[run_id]
        out: list[tuple[JobLines, int]] = []
        budget = LOG_BATCH_BYTES
        for j in jobs:
            if j.logs_state != IN_DATABASE or budget <= 0:
                continue
            page = store.read_log_page(j.id, cursor.get(j.job_name, 0), LOG_BATCH, budget)
            if page is not None:
                body, last_seq = page.body, page.last_seq
                if not blocks and is_blocks(body):  # as LogLines, as many as the budget holds (on this thread)
                    body, _, last_seq = lines_body(body, budget)
                budget -= len(body)
                out.append((JobLines(j.job_name, body=body), last_seq))
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
            for jl, last_seq in p.lines:
                cursor[jl.job_name] = last_seq
            yield LogChunk([jl for jl, _ in p.lines], dict(cursor))
            continue
        if moved:
            continue  # read again: the run may have ended meanwhile
        if not follow:
            return
        if p.finished:
            yield LogChunk([], dict(cursor), finished_run=await core.run(run.name))
            return
        try:
            # Not wait_for: on Python 3.11 it returns when the event is set just as the follower is cancelled,
            # swallowing the cancel (the stream would then poll on, holding its place, after its client left).
            async with asyncio.timeout(FOLLOW_RECHECK_S):
                await event.wait()
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
