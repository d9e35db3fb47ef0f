"""Parts of runs' records (docs/reproducibility.md): JSON documents the coordinator keeps per run and job.

A part is written once by whoever knows it (the submission: the resolved workflow; the agent, through
the coordinator's sanitiser: a job attempt's environment) and read back together by `GetRunRecord`,
which adds what the other tables already hold (specs, code, statuses, times, inputs, manifests).
"""

from __future__ import annotations

import json
from typing import Any

from dstack.coordinator import stored
from dstack.coordinator.store.base import Db

RUN_PART = ""  # job_id of a part that belongs to the run as a whole


class Records:
    def __init__(self, db: Db) -> None:
        self.db = db

    def put(self, run_id: str, job_id: str, part: str, body: dict[str, Any]) -> None:
        self.put_parts(run_id, job_id, {part: body})

    def put_parts(self, run_id: str, job_id: str, parts: dict[str, dict[str, Any]]) -> None:
        """Several parts of one run (or job) in one statement: a submission writes two."""
        now = self.db.clock()
        with self.db.tx() as c:
            c.executemany(
                "INSERT OR REPLACE INTO records (run_id, job_id, part, body, written_at) VALUES (?, ?, ?, ?, ?)",
                [(run_id, job_id, part, json.dumps(body, sort_keys=True), now) for part, body in parts.items()],
            )

    def put_job_part(self, job_id: str, part: str, body: dict[str, Any]) -> bool:
        """Writes a job's part; False when the job is unknown."""
        with self.db.tx() as c:
            # Its run found by the write itself: one statement per part (an environment is one per job).
            written = c.execute(
                "INSERT OR REPLACE INTO records (run_id, job_id, part, body, written_at)"
                " SELECT run_id, id, ?, ?, ? FROM jobs WHERE id = ?",
                [part, json.dumps(body, sort_keys=True), self.db.clock(), job_id],
            ).rowcount
        return written > 0

    def of_run(self, run_id: str) -> dict[tuple[str, str], dict[str, Any]]:
        """(job_id, part) -> body of every part of the run; a damaged one is left out (logged)."""
        found = self.db.rows("SELECT job_id, part, body FROM records WHERE run_id = ?", [run_id])
        bodies = (
            (r["job_id"], r["part"], stored.record_part(run_id, r["job_id"], r["part"], r["body"])) for r in found
        )
        return {(job_id, part): body for job_id, part, body in bodies if body is not None}

    def delete_run(self, run_id: str) -> None:
        with self.db.tx() as c:
            c.execute("DELETE FROM records WHERE run_id = ?", [run_id])
