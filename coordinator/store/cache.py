"""The step cache's rows (coordinator/cache.py computes the keys): each job's key, the done job a new
one can reuse, and the hit itself, which moves the job to done with the reused files in one step."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from dstack.coordinator import lifecycle
from dstack.coordinator.cache import CACHE_PART, full_key, image_of
from dstack.coordinator.model import JobStatus
from dstack.coordinator.store.artifacts import FileRecord, inputs_from
from dstack.coordinator.store.base import Db, rows


@dataclass(frozen=True)
class CacheHit:
    """A waiting job (`job_id` of `run_name`) that can take `source_job`'s artifacts instead of running."""

    job_id: str
    run_id: str
    run_name: str
    job_name: str
    key: str
    source_job_id: str
    source_run: str
    source_job: str
    files: tuple[FileRecord, ...]


def key_job(c: sqlite3.Connection, job_id: str) -> str:
    """The job's whole key, now that its inputs are known, stored on it; "" for a job the cache does not
    take (an upload, a gang member, a job stored before the cache)."""
    row = c.execute("SELECT cache_base, run_id, depends_on, inputs FROM jobs WHERE id = ?", [job_id]).fetchone()
    if row is None or not row[0]:
        return ""
    key = key_of_row(c, row[0], row[1], row[2], row[3])
    c.execute("UPDATE jobs SET cache_key = ? WHERE id = ?", [key, job_id])
    return key


_NO_INPUTS = ("", "[]")
_KEYS_WITHOUT_INPUTS: dict[str, str] = {}  # base -> whole key, for jobs with no inputs (most of them)
_KEYS_KEPT = 4096


def key_of_row(c: sqlite3.Connection, base: str, run_id: str, depends_on: str | None, inputs: str | None) -> str:
    """The whole key of a job whose row (its cache_base, run_id, depends_on and inputs columns) was read
    already. A job with no inputs has a key that is a function of its base alone: many single-job runs of
    one workflow share it, so it is worked out once (a digest of a JSON document) and kept."""
    key = key_without_inputs(base, depends_on, inputs)
    if key is not None:
        return key
    return full_key(base, inputs_from(c, run_id, depends_on or "", inputs or ""))


def key_without_inputs(base: str, depends_on: str | None, inputs: str | None) -> str | None:
    """`key_of_row` for a job that has no inputs, without the database; None for one that has (its key
    reads what its inputs are now)."""
    if (depends_on or "") not in _NO_INPUTS or (inputs or "") not in _NO_INPUTS:
        return None
    key = _KEYS_WITHOUT_INPUTS.get(base)
    if key is None:
        if len(_KEYS_WITHOUT_INPUTS) >= _KEYS_KEPT:
            _KEYS_WITHOUT_INPUTS.clear()
        key = _KEYS_WITHOUT_INPUTS[base] = full_key(base, [])
    return key


class StepCache:
    def __init__(self, db: Db) -> None:
        self.db = db

    def find_hit(self, job_id: str) -> CacheHit | None:
        """Keys a waiting job and finds the newest done job with its key whose artifacts are still kept
        (same repository: the key holds it). None: it runs."""
        with self.db.tx() as c:
            key = key_job(c, job_id)
            if not key:
                return None
            source = rows(
                c,
                "SELECT j.id, j.job_name, r.name AS run_name FROM jobs j JOIN runs r ON r.id = j.run_id"
                " WHERE j.cache_key = ? AND j.status = ? AND j.id != ? AND r.artifacts_deleted = 0"
                " ORDER BY j.finished_at DESC LIMIT 1",
                [key, int(JobStatus.DONE), job_id],
            )
            if not source:
                return None
            me = rows(
                c,
                "SELECT j.run_id, j.job_name, r.name AS run_name FROM jobs j JOIN runs r ON r.id = j.run_id"
                " WHERE j.id = ?",
                [job_id],
            )[0]
            files = tuple(
                (r[0], r[1], r[2])
                for r in c.execute(
                    "SELECT path, size, sha256 FROM artifacts WHERE job_id = ? ORDER BY path", [source[0]["id"]]
                )
            )
            return CacheHit(
                job_id,
                me["run_id"],
                me["run_name"],
                me["job_name"],
                key,
                source[0]["id"],
                source[0]["run_name"],
                source[0]["job_name"],
                files,
            )

    def complete_hit(self, hit: CacheHit) -> bool:
        """The job is done with the source's files (already copied under its own name in the object store);
        False when it left the queue meanwhile (stopped)."""
        now = self.db.clock()
        with self.db.tx() as c:
            moved = lifecycle.move_job(
                c, lifecycle.CACHE_HIT, hit.job_id, message=f"reused from {hit.source_run}", at=now
            )
            if moved is None:
                return False
            c.execute("DELETE FROM artifacts WHERE job_id = ?", [hit.job_id])
            c.executemany(
                "INSERT INTO artifacts (job_id, path, size, sha256) VALUES (?, ?, ?, ?)",
                [(hit.job_id, p, s, h) for p, s, h in hit.files],
            )
            self._put_part(c, hit.run_id, hit.job_id, self.part(hit, c))
            lifecycle.refresh_run_status(c, hit.run_id, now)
            return True

    @staticmethod
    def part(hit: CacheHit, c: sqlite3.Connection) -> dict[str, Any]:
        spec = c.execute("SELECT spec FROM jobs WHERE id = ?", [hit.job_id]).fetchone()[0]
        return {
            "key": hit.key,
            "hit": True,
            "source_run": hit.source_run,
            "source_job": hit.source_job,
            **image_of(spec),
        }

    def _put_part(self, c: sqlite3.Connection, run_id: str, job_id: str, body: dict[str, Any]) -> None:
        c.execute(
            "INSERT OR REPLACE INTO records (run_id, job_id, part, body, written_at) VALUES (?, ?, ?, ?, ?)",
            [run_id, job_id, CACHE_PART, json.dumps(body, sort_keys=True), self.db.clock()],
        )

    def forget(self, job_id: str) -> None:
        """A source whose files are gone from the object store: never offered again."""
        with self.db.tx() as c:
            c.execute("UPDATE jobs SET cache_key = '' WHERE id = ?", [job_id])

    def forget_run(self, c: sqlite3.Connection, run_id: str) -> None:
        """The run's artifacts were deleted (retention): its jobs feed the cache no more."""
        c.execute("UPDATE jobs SET cache_key = '' WHERE run_id = ?", [run_id])

    def keys_of_run(self, run_id: str) -> dict[str, str]:
        """job id -> key, of the run's keyed jobs (the run's record shows them)."""
        return {
            r[0]: r[1]
            for r in self.db.conn.execute(
                "SELECT id, cache_key FROM jobs WHERE run_id = ? AND cache_key != ''", [run_id]
            )
        }
