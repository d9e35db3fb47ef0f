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
from collections.abc import Iterator
from typing import BinaryIO

from dstack.coordinator.artifacts import Artifacts, logs_key
from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.model import LogLine
from dstack.coordinator.store import Store
from dstack.coordinator.store.executor import DbExecutor

log = logging.getLogger("dstack.coordinator")
BATCH = 100


def pack_logs(rows: list[LogLine]) -> bytes:
    """The archive format (docs/storage.md): gzipped JSON lines, one per log line."""
    body = "".join(json.dumps({"seq": r.seq, "stream": r.stream, "t": r.time_ns, "text": r.text}) + "\n" for r in rows)
    return gzip.compress(body.encode(), compresslevel=6)


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

    async def run_forever(self) -> None:
        while True:
            try:
                await self.pass_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the store may be down: try again next round, lose nothing
                log.warning("log archiving/retention failed, will retry: %s", e)
            await asyncio.sleep(self.config.archive_interval_s)

    async def pass_once(self) -> int:
        now = self.store.clock()
        archived = 0
        while True:
            jobs = await self.db(self.store.jobs_to_archive, now - int(self.config.archive_after_s * 1e9), BATCH)
            for job in jobs:
                rows = await self.db(self.store.all_logs, job.id)
                data = await asyncio.to_thread(pack_logs, rows)
                key = logs_key(job.run_name, job.job_name)
                await asyncio.to_thread(self.artifacts.store.put_bytes, key, data)
                await self.db(self.store.mark_logs_archived, job.id)
                archived += 1
            if len(jobs) < BATCH:
                break
        if self.config.retention_days is not None:
            await self._expire(now - int(self.config.retention_days * 86400e9))
        return archived

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
