"""Job logs in chunks: one row per batch an agent sent (first and last sequence number, the lines as
serialized protobuf), stored once however often an agent resends them, and archived to the object
store once a job has been finished a while (coordinator/retention.py).

A chunk's body is the serialized `repeated dstack.v1.LogLine` field 2 of a message, or (from an agent
that sends its lines packed) the `repeated dstack.v1.LogBlock` field 3: what an agent's `LogBatch`
carries after its job id, and what a client's `JobLogs` carries after its job name. Bodies of one kind
concatenate into a longer list, so a batch is stored as the agent sent it and served as it is stored,
without a Python object per line on either side (a job printing 200,000 lines a second); a page is of
one kind only (lines and blocks would not keep their order in one message), and a client that does not
read blocks gets their lines as LogLines (`lines_body`). The lines' seqs are the stored ones
(coordinator/attempts.py): for attempt 1 the agent's own.

Lines of a job arrive in order (agent/outbox.py: consecutive seqs, resent from the coordinator's
position after a reconnect), so a line at or below the attempt's last stored seq is a resend: the
overlapping part of a batch is cut off, and the rest stored once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from dstack.coordinator import stored
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


BLOCKS_KIND = b"\x1a"  # a body of LogBlocks starts with JobLogs field 3's tag (LogLines: field 2's, b"\x12")


def is_blocks(body: bytes) -> bool:
    return body[:1] == BLOCKS_KIND


def lines_of(body: bytes) -> list[LogLine]:
    msg = client_pb2.JobLogs.FromString(body)
    out = [LogLine(ln.seq, ln.stream, ln.time_ns, ln.text) for ln in msg.lines]
    for b in msg.blocks:
        first, stream, time_ns = b.first_seq, b.stream, b.time_ns
        out += [LogLine(first + i, stream, time_ns, text) for i, text in enumerate(b.text.split("\n"))]
    return out


def lines_body(body: bytes, max_bytes: int) -> tuple[bytes, int, int]:
    """A body's lines as LogLines (for a client that does not read blocks), stopping before `max_bytes`
    (at least one line): the body, how many lines, the last one's seq."""
    msg = client_pb2.JobLogs()
    add = msg.lines.add
    size = count = last = 0
    for ln in lines_of(body):
        size += len(ln.text.encode()) + 32  # the line's text and the rest of its message, generously
        if count and size > max_bytes:
            break
        add(seq=ln.seq, stream=ln.stream, time_ns=ln.time_ns, text=ln.text)
        count, last = count + 1, ln.seq
    return msg.SerializeToString(), count, last


def batch_lines(b: agent_pb2.LogBatch) -> int:
    """How many lines an agent's batch says it carries."""
    return len(b.lines) + sum(blk.count for blk in b.blocks)


def batch_last_seq(b: agent_pb2.LogBatch) -> int:
    """The seq of a batch's last line, in the agent's numbering: what acknowledging it names (0: none)."""
    if b.blocks:
        last = b.blocks[-1]
        return int(last.first_seq) + max(int(last.count), 1) - 1
    return int(b.lines[-1].seq) if b.lines else 0


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
class StoredChunk:
    """One log_chunks row: what insert stores for a batch, and what it hands to the caller once committed
    (coordinator/log_feed.py gives it straight to the run's caught-up followers)."""

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

    def insert(
        self, batches: Sequence[LogBatch | agent_pb2.LogBatch], stored: list[StoredChunk] | None = None
    ) -> list[LogAck]:
        """Batches as an agent sends them: by the id and seqs of one attempt (coordinator/attempts.py),
        each stored as one chunk in the attempt's range of the job's seqs, and acknowledged as sent.
        Past the job's quota, lines are acknowledged but dropped, and one marker line (once) says so.
        `stored`, if given, gets the chunks written, in order, once their transaction is over (inside a
        DbExecutor batch, the batch commits later: its caller learns of them only after that commit)."""
        acks = []
        written: list[StoredChunk] = []
        try:
            with self.db.tx() as c:
                for b in batches:
                    pb = b if isinstance(b, agent_pb2.LogBatch) else _to_proto(b)
                    if not pb.lines and not pb.blocks:
                        continue
                    # Lines and blocks in one batch: not what an agent sends (their order would be lost);
                    # acknowledged and dropped, like lines whose seqs do not follow.
                    for piece in _pieces(pb) if not (pb.lines and pb.blocks) else []:
                        chunk = self._chunk(piece)
                        if chunk is not None:
                            cur = c.execute(
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
                            if cur.rowcount == 1:
                                written.append(chunk)
                    acks.append(LogAck(b.job_id, batch_last_seq(pb)))
        except BaseException:
            # Not stored (a full disk...): the counts and positions are read again from the database.
            for b in batches:
                job_id, attempt = parse_wire_job_id(b.job_id)
                self._usage.pop(job_id, None)
                self._last.pop((job_id, attempt), None)
            raise
        if stored is not None:
            stored.extend(written)
        return acks

    def _chunk(self, b: agent_pb2.LogBatch) -> StoredChunk | None:
        """What of the batch is stored: none of what is stored already or past the quota."""
        if b.blocks:
            return self._blocks_chunk(b)
        job_id, attempt = parse_wire_job_id(b.job_id)
        lines = b.lines
        first, last, n = lines[0].seq, lines[-1].seq, len(lines)
        if first < 1 or last - first + 1 != n or last >= 1 << SEQ_BITS:
            # Not consecutive from 1: not what an agent sends (agent/outbox.py). Acknowledged (an agent
            # resending it would resend it forever) and dropped: it could not be paged by its seqs.
            return None
        stored_upto = self._claim(job_id, attempt, last)
        if stored_upto is None:
            return None  # wholly a resend
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
                return StoredChunk(job_id, first, last, text_bytes, marked, whole[len(head) :])
        if msg is None:
            msg = client_pb2.JobLogs()
            msg.lines.extend(lines)
        if base:
            for ln in msg.lines:
                ln.seq += base
        return StoredChunk(job_id, msg.lines[0].seq, msg.lines[-1].seq, text_bytes, marked, msg.SerializeToString())

    def _blocks_chunk(self, b: agent_pb2.LogBatch) -> StoredChunk | None:
        """_chunk for a batch of LogBlocks: the same cuts (a resend, the quota), made per block; no
        object per line but where a cut falls inside a block."""
        job_id, attempt = parse_wire_job_id(b.job_id)
        blocks = [_Blk(x.first_seq, x.count, int(x.stream), x.time_ns, x.text) for x in b.blocks]
        first = seq = blocks[0].first
        for x in blocks:
            if x.first != seq or x.count < 1 or x.text.count("\n") != x.count - 1:
                return None  # not consecutive, or a count its text does not have: as _chunk's lines
            seq += x.count
        last = seq - 1
        if first < 1 or last >= 1 << SEQ_BITS:
            return None
        stored_upto = self._claim(job_id, attempt, last)
        if stored_upto is None:
            return None  # wholly a resend
        changed = False
        if first <= stored_upto:  # partly a resend: the rest is stored
            blocks = _blocks_after(blocks, stored_upto)
            changed = True
        text_bytes = sum(len(x.text) if x.text.isascii() else len(x.text.encode()) for x in blocks) - sum(
            x.count - 1 for x in blocks
        )
        marked = False
        if self.max_bytes > 0:
            usage = self._usage.get(job_id) or self._load_usage(job_id)
            if usage.full:
                return None
            if usage.stored + text_bytes > self.max_bytes:
                blocks, text_bytes, dropped = _cut_blocks(blocks, self.max_bytes - usage.stored)
                usage.full = marked = changed = True
                # In the place of the first line dropped: readers see it where the log stops.
                system = int(LogStream.SYSTEM)
                blocks.append(_Blk(dropped[0], 1, system, dropped[1], quota_marker(self.max_bytes)))
            usage.stored += text_bytes
        base = attempt_base(attempt)
        if not changed and base == 0:
            # The common case: the agent's serialization, less its job id (serialized first, field 1).
            whole = b.SerializeToString()
            head = agent_pb2.LogBatch(job_id=b.job_id).SerializeToString()
            if whole.startswith(head):
                return StoredChunk(job_id, first, last, text_bytes, marked, whole[len(head) :])
        msg = client_pb2.JobLogs()
        add = msg.blocks.add
        for x in blocks:
            add(first_seq=x.first + base, count=x.count, stream=x.stream, time_ns=x.time_ns, text=x.text)
        return StoredChunk(
            job_id, blocks[0].first + base, blocks[-1].last + base, text_bytes, marked, msg.SerializeToString()
        )

    def _claim(self, job_id: str, attempt: int, last: int) -> int | None:
        """The last seq stored of (job, attempt) before a batch that ends at `last`, which is then taken as
        stored; None when the batch is wholly a resend."""
        key = (job_id, attempt)
        stored_upto = self._last.get(key)
        if stored_upto is None:
            stored_upto = self._load_last(job_id, attempt)
        if last <= stored_upto:
            return None
        self._last[key] = last
        return stored_upto

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
                body = stored.log_chunk(job_id, first, last_seq, body)
                if first <= after_seq:  # the cursor is inside this chunk
                    body, n = body_after(body, after_seq)
                else:
                    n = last_seq - first + 1
                if parts and size + len(body) > max_bytes:
                    break  # a page stays within max_bytes (one response within gRPC's message limit)
                if parts and is_blocks(body) != is_blocks(parts[0]):
                    break  # a page of one kind: lines and blocks in one message would lose their order
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
        for first, last, body in self.db.conn.execute(
            "SELECT first_seq, last_seq, body FROM log_chunks WHERE job_id = ? ORDER BY first_seq", [job_id]
        ):
            out += lines_of(stored.log_chunk(job_id, first, last, body))
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
    if b.blocks:
        return _block_pieces(b)
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


def _block_pieces(b: agent_pb2.LogBatch) -> list[agent_pb2.LogBatch]:
    """_pieces for a batch of blocks: whole blocks, and a block bigger than a chunk cut between its lines."""
    out: list[agent_pb2.LogBatch] = []
    part: list[common_pb2.LogBlock] = []
    size = 0
    for blk in b.blocks:
        for piece in _split_block(blk) if blk.ByteSize() > CHUNK_BYTES // 2 else [blk]:
            n = piece.ByteSize() + 8
            if part and size + n > CHUNK_BYTES:
                out.append(agent_pb2.LogBatch(job_id=b.job_id, blocks=part))
                part, size = [], 0
            part.append(piece)
            size += n
    out.append(agent_pb2.LogBatch(job_id=b.job_id, blocks=part))
    return out


def _split_block(blk: common_pb2.LogBlock) -> list[common_pb2.LogBlock]:
    """A big block as blocks of about half a chunk each (a line longer than that alone in its block).
    A block whose count its text does not have is left whole: it is refused as it is (_blocks_chunk)."""
    lines = blk.text.split("\n")
    if len(lines) != blk.count:
        return [blk]
    out: list[common_pb2.LogBlock] = []
    start = size = 0
    for i, line in enumerate(lines):
        n = len(line.encode()) + 1
        if i > start and size + n > CHUNK_BYTES // 2:
            out.append(_sub_block(blk, lines, start, i))
            start, size = i, 0
        size += n
    out.append(_sub_block(blk, lines, start, len(lines)))
    return out


def _sub_block(blk: common_pb2.LogBlock, lines: list[str], start: int, end: int) -> common_pb2.LogBlock:
    return common_pb2.LogBlock(
        first_seq=blk.first_seq + start,
        count=end - start,
        stream=blk.stream,
        time_ns=blk.time_ns,
        text="\n".join(lines[start:end]),
    )


@dataclass(frozen=True)
class _Blk:
    """A LogBlock's fields, as plain Python."""

    first: int
    count: int
    stream: int
    time_ns: int
    text: str

    @property
    def last(self) -> int:
        return self.first + self.count - 1


def _blocks_after(blocks: list[_Blk], after_seq: int) -> list[_Blk]:
    """The lines of consecutive blocks after `after_seq`, the block it falls in cut."""
    out = []
    for x in blocks:
        if x.last <= after_seq:
            continue
        if x.first <= after_seq:
            k = after_seq - x.first + 1
            x = _Blk(after_seq + 1, x.count - k, x.stream, x.time_ns, x.text.split("\n", k)[k])
        out.append(x)
    return out


def _cut_blocks(blocks: list[_Blk], room: int) -> tuple[list[_Blk], int, tuple[int, int]]:
    """The lines of the blocks that fit in `room` bytes of text (which all of them do not), their bytes,
    and the seq and time of the first line that does not fit."""
    kept: list[_Blk] = []
    used = 0
    for x in blocks:
        lines = x.text.split("\n")
        for i, line in enumerate(lines):
            n = len(line.encode())
            if used + n > room:
                if i:
                    kept.append(_Blk(x.first, i, x.stream, x.time_ns, "\n".join(lines[:i])))
                return kept, used, (x.first + i, x.time_ns)
            used += n
        kept.append(x)
    last = blocks[-1]  # all fit after all (not reached: their bytes were over the room)
    return kept, used, (last.last, last.time_ns)


def body_after(body: bytes, after_seq: int) -> tuple[bytes, int]:
    """A chunk's lines after `after_seq` (a cursor inside it), and how many."""
    msg = client_pb2.JobLogs.FromString(body)
    if msg.blocks:
        blocks = _blocks_after(
            [_Blk(x.first_seq, x.count, int(x.stream), x.time_ns, x.text) for x in msg.blocks], after_seq
        )
        out = client_pb2.JobLogs()
        for x in blocks:
            out.blocks.add(first_seq=x.first, count=x.count, stream=x.stream, time_ns=x.time_ns, text=x.text)
        return out.SerializeToString(), sum(x.count for x in blocks)
    lines = msg.lines
    k = after_seq - lines[0].seq + 1  # seqs in a chunk are consecutive
    if not (0 <= k <= len(lines) and (k == len(lines) or lines[k].seq == after_seq + 1)):
        k = next((i for i, ln in enumerate(lines) if ln.seq > after_seq), len(lines))
    del lines[:k]
    return msg.SerializeToString(), len(lines)
