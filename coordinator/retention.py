"""Moves the logs of finished jobs from SQLite into the store, and applies the retention policy.

Logs are archived once a job has been finished for `archive_after_s` (so `dstack logs -f` of a
just-finished run reads the database), as runs/<run>/<job>/logs.jsonl.gz; the object is written
before the rows are deleted, so a crash in between only means the archive is written again.
With `retention_days`, the archived logs of runs finished longer ago are deleted, and with
`retention_artifacts` also the artifacts of such runs that have no tag.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from typing import BinaryIO

from dstack.coordinator.artifacts import Artifacts, logs_key
from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.errors import InvalidRequest
from dstack.coordinator.gc import GarbageCollector
from dstack.coordinator.model import LogLine
from dstack.coordinator.store import Store
from dstack.coordinator.store.executor import DbExecutor
from dstack.storage.base import check_key
from dstack.storage.errors import InvalidKey

log = logging.getLogger("dstack.coordinator")
BATCH = 100
PAGE = 5000  # log lines read from the database at a time while archiving
CHUNK = 1 << 20  # bytes per piece handed to the store


def pack_logs(rows: list[LogLine]) -> bytes:
    """The archive format (docs/storage.md): gzipped JSON lines, one per log line."""
    return gzip.compress(_jsonl(rows), compresslevel=6)


def _jsonl(rows: list[LogLine]) -> bytes:
    return "".join(
        json.dumps({"seq": r.seq, "stream": r.stream, "t": r.time_ns, "text": r.text}) + "\n" for r in rows
    ).encode()


def _file_chunks(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


def iter_log_archive(f: BinaryIO) -> Iterator[LogLine]:
    """What pack_logs wrote, line by line, from the open object (a long archive is never held whole)."""
    with gzip.open(f, "rt", encoding="utf-8") as lines:
        for d in map(json.loads, lines):
            yield LogLine(d["seq"], d["stream"], d["t"], d["text"])


class Retention:
    def __init__(self, config: CoordinatorConfig, store: Store, db: DbExecutor, artifacts: Artifacts) -> None:
        self.config = config
        self.store = store
        self.db = db
        self.artifacts = artifacts
        self.gc = GarbageCollector(store, db, artifacts.store, config.gc_grace_s)

    async def run_forever(self) -> None:
        last_gc = -math.inf
        while True:
            try:
                await self.pass_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the store may be down: try again next round, lose nothing
                log.warning("log archiving/retention failed, will retry: %s", e)
            if time.monotonic() - last_gc >= self.config.gc_interval_s:
                last_gc = time.monotonic()
                try:
                    await self.gc.pass_once()
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.warning("garbage collection in the store failed, will retry: %s", e)
            await asyncio.sleep(min(self.config.archive_interval_s, self.config.gc_interval_s))

    async def pass_once(self) -> int:
        now = self.store.clock()
        archived = 0
        after_id = ""  # jobs ordered by id: one that cannot be archived is passed over, not retried forever
        while True:
            jobs = await self.db(
                self.store.jobs_to_archive, now - int(self.config.archive_after_s * 1e9), BATCH, after_id
            )
            for job in jobs:
                after_id = job.id
                try:
                    key = logs_key(job.run_name, job.job_name)
                    check_key(key)
                except (InvalidKey, InvalidRequest) as e:
                    # A name stored before names were checked (coordinator/app/key_names.py): its logs stay
                    # in the database, readable, and every other job is archived.
                    log.warning("not archiving the logs of %s/%s: %s", job.run_name, job.job_name, e)
                    continue
                await self._archive(job.id, key)
                await self.db(self.store.mark_logs_archived, job.id)
                archived += 1
            if len(jobs) < BATCH:
                break
        if self.config.retention_days is not None:
            await self._expire(now - int(self.config.retention_days * 86400e9))
        return archived

    async def _archive(self, job_id: str, key: str) -> None:
        """Writes the job's lines to the store in constant memory: read from the database a page at a time,
        gzipped into a spool file (in the state folder, not in memory), then streamed to the store (S3 sends
        a big object in multipart pieces)."""
        with tempfile.TemporaryFile(dir=self.config.state_dir, prefix=".archive-") as spool:
            gz = gzip.GzipFile(fileobj=spool, mode="wb", compresslevel=6)
            after = 0
            while rows := await self.db(self.store.read_logs, job_id, after, PAGE):
                await asyncio.to_thread(gz.write, _jsonl(rows))
                after = rows[-1].seq
            await asyncio.to_thread(gz.close)
            spool.seek(0)
            await asyncio.to_thread(self.artifacts.store.put_stream, key, _file_chunks(spool))

    async def _expire(self, before: int) -> None:
        for run in await self.db(self.store.expired_runs, before):
            drop_artifacts = self.config.retention_artifacts and not run.tagged and not run.artifacts_deleted
            if not (run.has_logs or drop_artifacts):
                continue
            jobs = (await self.db(self.store.jobs_of_runs, [run.id]))[run.id]
            if run.has_logs:
                for j in jobs:
                    await asyncio.to_thread(self.artifacts.store.delete_prefix, logs_key(run.name, j.job_name))
                await self.db(self.store.mark_logs_deleted, run.id)
                log.info("retention: deleted the logs of run %s", run.name)
            if drop_artifacts:
                for j in jobs:
                    await self.artifacts.delete_job_artifacts(run.name, j.job_name)
                await self.db(self.store.mark_artifacts_deleted, run.id)
                log.info("retention: deleted the artifacts of untagged run %s", run.name)
