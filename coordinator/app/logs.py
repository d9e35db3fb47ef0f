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
from dstack.coordinator.store.logs import StoredChunk, body_after, body_of, is_blocks, lines_body, lines_of

LOG_BATCH = 5000
LOG_BATCH_BYTES = 3 << 20  # one response (whole chunks, within this) stays below gRPC's 4 MiB default limit
IN_DATABASE, ARCHIVED, DELETED = 0, 1, 2
# A follower wakes when its run's lines or state change (coordinator/log_feed.py: handed each chunk once it is
# stored); it also reads again after this long without a wake-up, in case a change came some other way.
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
    names: dict[str, str]  # job id -> job name, of the jobs whose lines are in the database


async def stream_logs(
    core: Core, run_name: str, follow: bool, after: Mapping[str, int] | None = None, blocks: bool = False
) -> AsyncGenerator[LogChunk, None]:
    """Every line of the run after `after`; with `follow`, until the run has finished (the last
    chunk then carries the finished run). A JobLines' body may hold LogBlocks only if `blocks` (the
    client reads them: StreamLogsRequest.blocks).

    A follower reads the store until it has every line there (caught up); from then on it sends the chunks
    the engine hands it as they are committed (coordinator/log_feed.py), and reads the store again only
    when a chunk does not follow its cursor, its buffer overflowed, or something else about the run changed."""
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
        names = {j.id: j.job_name for j in jobs if j.logs_state == IN_DATABASE}
        return _Poll(finished, out, {j.job_name: j.logs_state for j in jobs}, names)

    with core.engine.watchers.follow(run_id) if follow else contextlib.nullcontext() as feed:
        names: dict[str, str] = {}
        caught_up = False  # the last read of the store found no line after the cursor
        while True:
            if feed is not None:
                # Before any read of the store: what is handed from now on comes after that read.
                handed, reread = feed.take()
                if caught_up and not reread:
                    out, sent, whole = _hand_off(handed, names, cursor, blocks)
                    if sent:
                        core.engine.metrics.log_chunks_handed.inc(sent)
                    for chunk in out:
                        yield chunk
                    if whole:
                        if not out:
                            await feed.wait_or_recheck(FOLLOW_RECHECK_S)
                        continue
                    # A chunk that does not follow (a new attempt, a job not read yet): from the store.
            caught_up = False
            p = await core.read(poll)
            names = p.names
            moved = False
            for name, state in p.states.items():
                if state != IN_DATABASE and name not in done:
                    async for chunk in _from_archive(core, run.name, name, state, cursor):
                        yield chunk
                    done.add(name)
                    moved = True
            if p.lines:
                if feed is not None:
                    feed.changed()  # it reads the store again next: nothing is kept for it meanwhile
                for jl, last_seq in p.lines:
                    cursor[jl.job_name] = last_seq
                yield LogChunk([jl for jl, _ in p.lines], dict(cursor))
                continue
            if moved:
                continue  # read again: the run may have ended meanwhile
            if feed is None:
                return
            if p.finished:
                yield LogChunk([], dict(cursor), finished_run=await core.run(run.name))
                return
            caught_up = True
            await feed.wait_or_recheck(FOLLOW_RECHECK_S)


def _hand_off(
    handed: list[StoredChunk], names: Mapping[str, str], cursor: dict[str, int], blocks: bool
) -> tuple[list[LogChunk], int, bool]:
    """Responses of the chunks handed to a caught-up follower that follow its cursor (which they advance),
    in their order; how many chunks they hold; and False if they stop at one that does not follow (the
    store has what comes between), or that this follower cannot take as it is (LogBlocks for a client
    that reads LogLines only). Chunks before the cursor (stored before its last read of the store) are
    skipped."""
    out: list[LogChunk] = []
    parts: dict[str, list[bytes]] = {}  # job name -> bodies in this response, in order
    size = sent = 0

    def respond() -> None:
        out.append(LogChunk([JobLines(name, body=b"".join(b)) for name, b in parts.items()], dict(cursor)))

    def stop() -> tuple[list[LogChunk], int, bool]:
        if parts:
            respond()
        return out, sent, False

    for c in handed:
        name = names.get(c.job_id)
        if name is None:
            return stop()
        at = cursor.get(name, 0)
        if c.last_seq <= at:
            continue
        body = c.body
        if c.first_seq <= at:  # partly sent by that read (never in practice: a chunk is read whole or not)
            body, _ = body_after(body, at)
        elif c.first_seq != at + 1:
            return stop()
        if not blocks and is_blocks(body):
            return stop()
        mine = parts.get(name)
        if (mine and is_blocks(mine[0]) != is_blocks(body)) or (size and size + len(body) > LOG_BATCH_BYTES):
            respond()  # one kind per job's body, and a response within gRPC's message limit
            parts, size = {}, 0
        parts.setdefault(name, []).append(body)
        size += len(body)
        cursor[name] = c.last_seq
        sent += 1
    if parts:
        respond()
    return out, sent, True


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
