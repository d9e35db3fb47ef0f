"""Job logs: lines with per-job sequence numbers, stored once however often an agent resends them,
and archived to the object store once a job has been finished a while (coordinator/retention.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dstack.coordinator.attempts import SEQ_BITS, attempt_base, parse_wire_job_id, stored_seq
from dstack.coordinator.model import TERMINAL_JOB, LogAck, LogBatch, LogLine, LogStream
from dstack.coordinator.store.base import Db, ints_in
from dstack.protos.v1 import agent_pb2


@dataclass(frozen=True)
class ArchivableJob:
    id: str
    job_name: str
    run_name: str


QUOTA_MARKER = "[dstack: this job's log reached the coordinator's quota of {} bytes (dstack server --max-log-bytes);"
QUOTA_MARKER_END = " later lines are dropped, the job keeps running]"


def quota_marker(max_bytes: int) -> str:
    return QUOTA_MARKER.format(max_bytes) + QUOTA_MARKER_END


@dataclass
class _Usage:
    stored: int  # bytes of text stored for the job
    full: bool  # the quota marker is stored: every later line is dropped
    last_seq: int  # the highest seq stored: a line at or below it is a resend, stored once and counted once


class Logs:
    def __init__(self, db: Db) -> None:
        self.db = db
        # Per-job log quota in bytes of text (0: none); set from CoordinatorConfig.max_log_bytes.
        self.max_bytes = 0
        self._usage: dict[str, _Usage] = {}  # job id -> its usage, loaded on first sight (DB thread only)

    def insert(self, batches: Sequence[LogBatch | agent_pb2.LogBatch]) -> list[LogAck]:
        """Batches as an agent sends them: by the id and seqs of one attempt (coordinator/attempts.py),
        stored in the attempt's range of the job's seqs, and acknowledged as sent. Past the job's quota,
        lines are acknowledged but dropped, and one marker line (once) says so."""
        acks = []
        try:
            with self.db.tx() as c:
                for b in batches:
                    if not b.lines:
                        continue
                    job_id, attempt = parse_wire_job_id(b.job_id)
                    base = stored_seq(attempt, 0)
                    # Straight from the agent's message (or the model's lines): one tuple per line, no object.
                    rows = [(job_id, base + ln.seq, int(ln.stream), ln.time_ns, ln.text) for ln in b.lines]
                    if self.max_bytes > 0:
                        rows = self._within_quota(job_id, rows)
                    c.executemany(
                        "INSERT OR IGNORE INTO logs (job_id, seq, stream, time_ns, text) VALUES (?, ?, ?, ?, ?)", rows
                    )
                    acks.append(LogAck(b.job_id, b.lines[-1].seq))
        except BaseException:
            # Not stored (a full disk...): the counts are read again from what the database holds.
            for b in batches:
                self._usage.pop(parse_wire_job_id(b.job_id)[0], None)
            raise
        return acks

    def _within_quota(
        self, job_id: str, rows: list[tuple[str, int, int, int, str]]
    ) -> list[tuple[str, int, int, int, str]]:
        usage = self._usage.get(job_id) or self._load_usage(job_id)
        if usage.full:
            return []
        if rows and rows[0][1] > usage.last_seq:  # all new lines (a batch's seqs are consecutive)
            # The whole batch's bytes in one encode; within the quota, every line is kept as it is.
            size = len("".join(row[4] for row in rows).encode())
            if usage.stored + size <= self.max_bytes:
                usage.stored += size
                usage.last_seq = rows[-1][1]
                return rows
        kept = []
        for row in rows:
            if row[1] <= usage.last_seq:  # resent after a reconnect: stored once (INSERT OR IGNORE), counted once
                kept.append(row)
                continue
            usage.last_seq = row[1]
            size = len(row[4].encode())
            if usage.stored + size > self.max_bytes:
                usage.full = True
                # In the place of the first line dropped: readers see it where the log stops.
                kept.append((job_id, row[1], int(LogStream.SYSTEM), row[3], quota_marker(self.max_bytes)))
                break
            usage.stored += size
            kept.append(row)
        return kept

    def _load_usage(self, job_id: str) -> _Usage:
        """After a restart: the bytes stored so far, and whether the marker is among them."""
        stored, marked, last_seq = self.db.conn.execute(
            "SELECT COALESCE(SUM(LENGTH(CAST(text AS BLOB))), 0), COALESCE(MAX(stream = ? AND text LIKE ?), 0),"
            " COALESCE(MAX(seq), 0) FROM logs WHERE job_id = ?",
            [int(LogStream.SYSTEM), "[dstack: this job's log reached the coordinator's quota%", job_id],
        ).fetchone()
        usage = _Usage(int(stored), bool(marked), int(last_seq))
        self._usage[job_id] = usage
        return usage

    def forget_all(self) -> None:
        """What was counted may not have been stored: count again from the database on next sight."""
        self._usage.clear()

    def forget(self, job_id: str) -> None:
        """The job has finished and its lines have left the database: no more lines will come for it."""
        self._usage.pop(job_id, None)

    def positions(self, wire_ids: Sequence[str]) -> dict[str, int]:
        """The last seq stored of each attempt an agent runs, in the agent's numbering (0: none)."""
        out = {}
        for w in wire_ids:
            job_id, attempt = parse_wire_job_id(w)
            base = attempt_base(attempt)
            row = self.db.conn.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM logs WHERE job_id = ? AND seq > ? AND seq <= ?",
                [job_id, base, base + (1 << SEQ_BITS) - 1],
            ).fetchone()
            out[w] = int(row[0]) - base if row[0] else 0
        return out

    def read(self, job_id: str, after_seq: int, limit: int, max_bytes: int = 4 << 20) -> list[LogLine]:
        """Lines after `after_seq`, at most `limit` of them and about `max_bytes` (at least one)."""
        cur = self.db.conn.execute(
            "SELECT seq, stream, time_ns, text FROM logs WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            [job_id, after_seq, limit],
        )
        out: list[LogLine] = []
        for r in cur:
            max_bytes -= len(r[3]) + 32
            if out and max_bytes < 0:
                break
            out.append(LogLine(r[0], r[1], r[2], r[3]))
        return out

    def all(self, job_id: str) -> list[LogLine]:
        return [
            LogLine(r[0], r[1], r[2], r[3])
            for r in self.db.conn.execute(
                "SELECT seq, stream, time_ns, text FROM logs WHERE job_id = ? ORDER BY seq", [job_id]
            )
        ]

    def jobs_to_archive(self, finished_before: int, limit: int, after_id: str = "") -> list[ArchivableJob]:
        """Finished jobs whose logs are still in the database, by id from after `after_id`."""
        rows = self.db.rows(
            "SELECT j.id, j.job_name, r.name AS run_name FROM jobs j JOIN runs r ON r.id = j.run_id"
            f" WHERE j.logs_state = 0 AND j.status IN ({ints_in(TERMINAL_JOB)}) AND j.finished_at < ?"
            " AND j.id > ? ORDER BY j.id LIMIT ?",
            [finished_before, after_id, limit],
        )
        return [ArchivableJob(r["id"], r["job_name"], r["run_name"]) for r in rows]

    def mark_archived(self, job_id: str) -> None:
        self.forget(job_id)
        with self.db.tx() as c:
            c.execute("UPDATE jobs SET logs_state = 1 WHERE id = ?", [job_id])
            c.execute("DELETE FROM logs WHERE job_id = ?", [job_id])

    def mark_deleted(self, run_id: str) -> None:
        """Retention deleted the run's archived logs."""
        with self.db.tx() as c:
            c.execute("DELETE FROM logs WHERE job_id IN (SELECT id FROM jobs WHERE run_id = ?)", [run_id])
            c.execute("UPDATE jobs SET logs_state = 2 WHERE run_id = ?", [run_id])
