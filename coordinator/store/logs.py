"""Job logs in chunks: one row per batch an agent sent (first and last sequence number, the lines as
serialized protobuf), stored once however often an agent resends them, and archived to the object
store once a job has been finished a while (coordinator/retention.py).

A chunk's body is the serialized `repeated dstack.v1.LogLine` field 2 of a message: what an agent's
`LogBatch` carries after its job id, and what a client's `JobLogs` carries after its job name. Bodies
concatenate into a longer list, so a batch is stored as the agent sent it and served as it is stored,
without a Python object per line on either side (a job printing 200,000 lines a second). The lines'
seqs are the stored ones (coordinator/attempts.py): for attempt 1 the agent's own.

Lines of a job arrive in order (agent/outbox.py: consecutive seqs, resent from the coordinator's
position after a reconnect), so a line at or below the attempt's last stored seq is a resend: the
overlapping part of a batch is cut off, and the rest stored once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from dstack.coordinator.attempts import SEQ_BITS, attempt_base, parse_wire_job_id
from dstack.coordinator.model import TERMINAL_JOB, LogAck, LogBatch, LogLine, LogStream
from dstack.coordinator.store.base import Db, ints_in
from dstack.protos.v1 import agent_pb2, client_pb2, common_pb2

log_lines_type = RepeatedCompositeFieldContainer[common_pb2.LogLine]


@dataclass(frozen=True)
class ArchivableJob:
    id: str
    job_name: str
    run_name: str


CHUNK_BYTES = 1 << 20  # a stored chunk at most (bigger batches are split): pages are built of whole chunks
QUOTA_MARKER = "[dstack: this job's log reached the coordinator's quota of {} bytes (dstack server --max-log-bytes);"
QUOTA_MARKER_END = " later lines are dropped, the job keeps running]"


def quota_marker(max_bytes: int) -> str:
    return QUOTA_MARKER.format(max_bytes) + QUOTA_MARKER_END


@dataclass(frozen=True)
class LogPage:
    """Consecutive lines of one job, as stored: `body` is their serialized list (merge it into a
    client_pb2.JobLogs), `last_seq` the seq of the last one."""

    body: bytes
    count: int
    last_seq: int

    def lines(self) -> list[LogLine]:
        return lines_of(self.body)


def lines_of(body: bytes) -> list[LogLine]:
    return [LogLine(ln.seq, ln.stream, ln.time_ns, ln.text) for ln in client_pb2.JobLogs.FromString(body).lines]


def body_of(lines: Iterable[LogLine]) -> bytes:
    """The stored form of lines (what migrations and tests build)."""
    msg = client_pb2.JobLogs()
    add = msg.lines.add
    for ln in lines:
        add(seq=ln.seq, stream=ln.stream, time_ns=ln.time_ns, text=ln.text)
    return msg.SerializeToString()


@dataclass
class _Usage:
    stored: int  # bytes of text stored for the job
    full: bool  # the quota marker is stored: every later line is dropped


@dataclass(frozen=True)
class _Chunk:
    job_id: str
    first_seq: int
    last_seq: int
    text_bytes: int
    marked: bool
    body: bytes


class Logs:
    def __init__(self, db: Db) -> None:
        self.db = db
        # Per-job log quota in bytes of text (0: none); set from CoordinatorConfig.max_log_bytes.
        self.max_bytes = 0
        self._usage: dict[str, _Usage] = {}  # job id -> its usage, loaded on first sight (DB thread only)
        self._last: dict[tuple[str, int], int] = {}  # (job id, attempt) -> last stored seq (DB thread only)

    def insert(self, batches: Sequence[LogBatch | agent_pb2.LogBatch]) -> list[LogAck]:
        """Batches as an agent sends them: by the id and seqs of one attempt (coordinator/attempts.py),
        each stored as one chunk in the attempt's range of the job's seqs, and acknowledged as sent.
        Past the job's quota, lines are acknowledged but dropped, and one marker line (once) says so."""
        acks = []
        try:
            with self.db.tx() as c:
                for b in batches:
                    if not b.lines:
                        continue
                    pb = b if isinstance(b, agent_pb2.LogBatch) else _to_proto(b)
                    for piece in _pieces(pb):
                        chunk = self._chunk(piece)
                        if chunk is not None:
                            c.execute(
                                "INSERT OR IGNORE INTO log_chunks"
                                " (job_id, first_seq, last_seq, text_bytes, marked, body) VALUES (?, ?, ?, ?, ?, ?)",
                                [
                                    chunk.job_id,
                                    chunk.first_seq,
                                    chunk.last_seq,
                                    chunk.text_bytes,
                                    chunk.marked,
                                    chunk.body,
                                ],
                            )
                    acks.append(LogAck(b.job_id, pb.lines[-1].seq))
        except BaseException:
            # Not stored (a full disk...): the counts and positions are read again from the database.
            for b in batches:
                job_id, attempt = parse_wire_job_id(b.job_id)
                self._usage.pop(job_id, None)
                self._last.pop((job_id, attempt), None)
            raise
        return acks

    def _chunk(self, b: agent_pb2.LogBatch) -> _Chunk | None:
        """What of the batch is stored: none of what is stored already or past the quota."""
        job_id, attempt = parse_wire_job_id(b.job_id)
        lines = b.lines
        first, last, n = lines[0].seq, lines[-1].seq, len(lines)
        if first < 1 or last - first + 1 != n or last >= 1 << SEQ_BITS:
            # Not consecutive from 1: not what an agent sends (agent/outbox.py). Acknowledged (an agent
            # resending it would resend it forever) and dropped: it could not be paged by its seqs.
            return None
        key = (job_id, attempt)
        stored_upto = self._last.get(key)
        if stored_upto is None:
            stored_upto = self._load_last(job_id, attempt)
        if last <= stored_upto:
            return None  # wholly a resend
        self._last[key] = last
        base = attempt_base(attempt)
        msg: client_pb2.JobLogs | None = None  # a copy, when the lines stored differ from the ones sent
        if first <= stored_upto:  # partly a resend: the rest is stored
            msg = client_pb2.JobLogs()
            msg.lines.extend(lines[stored_upto - first + 1 :])
            lines = msg.lines
        text_bytes = -1
        marked = False
        if self.max_bytes > 0:
            usage = self._usage.get(job_id) or self._load_usage(job_id)
            if usage.full:
                return None
            # The whole batch's bytes in one encode; within the quota, every line is kept as it is.
            text_bytes = len("".join([ln.text for ln in lines]).encode())
            if usage.stored + text_bytes > self.max_bytes:
                cut, text_bytes = _cut(lines, self.max_bytes - usage.stored)
                usage.full = marked = True
                # In the place of the first line dropped: readers see it where the log stops.
                dropped = lines[min(cut, len(lines) - 1)]
                marker_seq, marker_time = (dropped.seq if cut < len(lines) else last), dropped.time_ns
                if msg is None:
                    msg = client_pb2.JobLogs()
                    msg.lines.extend(lines[:cut])
                else:
                    del msg.lines[cut:]
                msg.lines.add(
                    seq=marker_seq,
                    stream=common_pb2.LogStream.ValueType(int(LogStream.SYSTEM)),
                    time_ns=marker_time,
                    text=quota_marker(self.max_bytes),
                )
                lines = msg.lines
            usage.stored += text_bytes
        if text_bytes < 0:
            text_bytes = len("".join([ln.text for ln in lines]).encode())
        if msg is None and base == 0:
            # The common case: the agent's serialization, less its job id (serialized first, field 1).
            whole = b.SerializeToString()
            head = agent_pb2.LogBatch(job_id=b.job_id).SerializeToString()
            if whole.startswith(head):
                return _Chunk(job_id, first, last, text_bytes, marked, whole[len(head) :])
        if msg is None:
            msg = client_pb2.JobLogs()
            msg.lines.extend(lines)
        if base:
            for ln in msg.lines:
                ln.seq += base
        return _Chunk(job_id, msg.lines[0].seq, msg.lines[-1].seq, text_bytes, marked, msg.SerializeToString())

    def _load_last(self, job_id: str, attempt: int) -> int:
        base = attempt_base(attempt)
        row = self.db.conn.execute(
            "SELECT MAX(last_seq) FROM log_chunks WHERE job_id = ? AND first_seq > ? AND first_seq <= ?",
            [job_id, base, base + (1 << SEQ_BITS) - 1],
        ).fetchone()
        last = int(row[0]) - base if row[0] is not None else 0
        self._last[(job_id, attempt)] = last
        return last

    def _load_usage(self, job_id: str) -> _Usage:
        """After a restart: the bytes stored so far, and whether the marker is among them."""
        stored, marked = self.db.conn.execute(
            "SELECT COALESCE(SUM(text_bytes), 0), COALESCE(MAX(marked), 0) FROM log_chunks WHERE job_id = ?",
            [job_id],
        ).fetchone()
        usage = _Usage(int(stored), bool(marked))
        self._usage[job_id] = usage
        return usage

    def forget_all(self) -> None:
        """What was counted may not have been stored: count again from the database on next sight."""
        self._usage.clear()
        self._last.clear()

    def forget(self, job_id: str) -> None:
        """The job has finished and its lines have left the database: no more lines will come for it."""
        self._usage.pop(job_id, None)
        for key in [k for k in self._last if k[0] == job_id]:
            del self._last[key]

    def positions(self, wire_ids: Sequence[str]) -> dict[str, int]:
        """The last seq stored of each attempt an agent runs, in the agent's numbering (0: none)."""
        out = {}
        for w in wire_ids:
            job_id, attempt = parse_wire_job_id(w)
            out[w] = self._load_last(job_id, attempt)
        return out

    def read_page(self, job_id: str, after_seq: int, limit: int, max_bytes: int = 4 << 20) -> LogPage | None:
        """Lines after `after_seq`: whole chunks (the first one cut at the cursor) until at least
        `limit` lines or `max_bytes` are read, at least one chunk; None when there are none."""
        cur = self.db.conn.execute(
            "SELECT first_seq, last_seq, body FROM log_chunks WHERE job_id = ? AND first_seq >= COALESCE("
            "(SELECT MAX(first_seq) FROM log_chunks WHERE job_id = ? AND first_seq <= ?), 0) ORDER BY first_seq",
            [job_id, job_id, after_seq],
        )
        parts: list[bytes] = []
        count = size = 0
        last = after_seq
        try:
            for first, last_seq, body in cur:
                if last_seq <= after_seq:
                    continue
                if first <= after_seq:  # the cursor is inside this chunk
                    body, n = _after(body, after_seq)
                else:
                    n = last_seq - first + 1
                if parts and size + len(body) > max_bytes:
                    break  # a page stays within max_bytes (one response within gRPC's message limit)
                parts.append(body)
                count += n
                size += len(body)
                last = last_seq
                if count >= limit or size >= max_bytes:
                    break
        finally:
            cur.close()
        return LogPage(b"".join(parts), count, last) if parts else None

    def read(self, job_id: str, after_seq: int, limit: int, max_bytes: int = 4 << 20) -> list[LogLine]:
        """Lines after `after_seq`, as read_page reads them."""
        page = self.read_page(job_id, after_seq, limit, max_bytes)
        return page.lines() if page is not None else []

    def all(self, job_id: str) -> list[LogLine]:
        out: list[LogLine] = []
        for (body,) in self.db.conn.execute(
            "SELECT body FROM log_chunks WHERE job_id = ? ORDER BY first_seq", [job_id]
        ):
            out += lines_of(body)
        return out

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
            c.execute("DELETE FROM log_chunks WHERE job_id = ?", [job_id])

    def mark_deleted(self, run_id: str) -> None:
        """Retention deleted the run's archived logs."""
        with self.db.tx() as c:
            c.execute("DELETE FROM log_chunks WHERE job_id IN (SELECT id FROM jobs WHERE run_id = ?)", [run_id])
            c.execute("UPDATE jobs SET logs_state = 2 WHERE run_id = ?", [run_id])


MIGRATION_CHUNK_LINES = 5000


def chunk_row_of(rows: Sequence[tuple[str, int, int, int, str]]) -> tuple[str, int, int, int, int, bytes]:
    """A log_chunks row of line rows of one job and attempt with consecutive seqs (the old `logs` table's
    (job_id, seq, stream, time_ns, text)), for the migration to chunks."""
    text = [r[4] for r in rows]
    marked = any(r[2] == int(LogStream.SYSTEM) and r[4].startswith(QUOTA_MARKER.split("{}")[0]) for r in rows)
    body = body_of(LogLine(r[1], r[2], r[3], r[4]) for r in rows)
    return rows[0][0], rows[0][1], rows[-1][1], len("".join(text).encode()), int(marked), body


def _to_proto(b: LogBatch) -> agent_pb2.LogBatch:
    msg = agent_pb2.LogBatch(job_id=b.job_id)
    add = msg.lines.add
    for ln in b.lines:
        add(seq=ln.seq, stream=ln.stream, time_ns=ln.time_ns, text=ln.text)
    return msg


def _cut(lines: log_lines_type, room: int) -> tuple[int, int]:
    """How many of the lines fit in `room` bytes of text, and their bytes."""
    used = 0
    for i, ln in enumerate(lines):
        n = len(ln.text.encode())
        if used + n > room:
            return i, used
        used += n
    return len(lines), used


def _pieces(b: agent_pb2.LogBatch) -> list[agent_pb2.LogBatch]:
    """The batch as stored chunks of at most CHUNK_BYTES each: an agent sends at most 1 MiB per batch,
    but the coordinator accepts bigger messages, and a page of chunks must fit in one client response."""
    if b.ByteSize() <= CHUNK_BYTES:
        return [b]
    out: list[agent_pb2.LogBatch] = []
    start = size = 0
    for i, ln in enumerate(b.lines):
        n = ln.ByteSize() + 8  # the line's own field header, generously
        if i > start and size + n > CHUNK_BYTES:
            out.append(agent_pb2.LogBatch(job_id=b.job_id, lines=b.lines[start:i]))
            start, size = i, 0
        size += n
    out.append(agent_pb2.LogBatch(job_id=b.job_id, lines=b.lines[start:]))
    return out


def _after(body: bytes, after_seq: int) -> tuple[bytes, int]:
    """A chunk's lines after `after_seq` (a cursor inside it), and how many."""
    msg = client_pb2.JobLogs.FromString(body)
    lines = msg.lines
    k = after_seq - lines[0].seq + 1  # seqs in a chunk are consecutive
    if not (0 <= k <= len(lines) and (k == len(lines) or lines[k].seq == after_seq + 1)):
        k = next((i for i, ln in enumerate(lines) if ln.seq > after_seq), len(lines))
    del lines[:k]
    return msg.SerializeToString(), len(lines)
