"""What the agent owes the coordinator: log lines and job updates, kept until acknowledged.

Each job's lines carry consecutive sequence numbers from 1. A line is dropped only once the
coordinator acknowledges it; after a reconnect everything unacknowledged is sent again from the
position the coordinator reports, so no line is lost and none is stored twice. A job's final update
is sent only after all of its lines.

Bounded (docs/state.md, "The agent's outbox"): a job's unacknowledged lines stay in memory up to
`job_memory_bytes` (and all jobs' up to `memory_bytes`); beyond that they go to a spool on disk
(agent/spool.py) in order, and come back into memory as acknowledgements make room, so the lines
sent are always the oldest unsent ones. A job owing `job_bytes` (memory and disk), or all jobs
owing `total_bytes`, wait in `room()`: the job's output is not read meanwhile, its pipe fills and
its writes block, so nothing is dropped and memory does not grow. Control traffic (job updates) is
taken apart from log batches (`take_control`, `take_logs`): the session writes it, and heartbeats,
first; a log batch is bounded in lines and bytes, and the bytes sent but not yet acknowledged are
bounded too, so a heartbeat written now waits behind little.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from dstack.agent.spool import Spool
from dstack.protos.v1 import agent_pb2, common_pb2

log = logging.getLogger("dstack.agent")
JS = common_pb2.JobStatus
FINAL = (JS.JOB_STATUS_DONE, JS.JOB_STATUS_FAILED, JS.JOB_STATUS_STOPPED)
# What a line costs besides its text, in memory (a LogLine object) and on the wire: an estimate, so the
# bounds hold for a job printing empty lines too.
LINE_OVERHEAD = 128


@dataclass(frozen=True)
class OutboxBounds:
    """The outbox's limits (agent options --outbox-memory, --max-job-outbox-bytes, --max-outbox-bytes)."""

    memory_bytes: int = 64 << 20  # all jobs' lines in memory; beyond it, lines spool to disk
    job_memory_bytes: int = 16 << 20  # one job's lines in memory
    job_bytes: int = 1 << 30  # one job's lines owed (memory and disk): its output is paused beyond it
    total_bytes: int = 4 << 30  # all jobs' lines owed: every job's output is paused beyond it
    # Lines sent and not yet acknowledged: no more log batches beyond it. What is in flight is what a
    # heartbeat written now waits behind at the coordinator (its stream is read in order): 2 MiB is about
    # 15,000 lines, a fraction of a second of a starved coordinator's work (8 MiB took over the 3 s
    # lease on a loaded 2-core host once the agent read a flooding job's output faster), and still far
    # more than the round trip needs at 200,000 lines/s.
    inflight_bytes: int = 2 << 20
    # Log batches sent and not yet acknowledged: no more beyond it, however small they are. The coordinator
    # reads a heartbeat (and acknowledges it in memory) only once it has read every message before it, and
    # it holds at most 16 read but unhandled (coordinator/services/agent.py, INBOX_MESSAGES): with more in
    # flight, a store stalled for seconds left heartbeats unread and this agent stopped healthy jobs
    # (self-fence). 2 MiB of one-line batches is thousands of messages; 8 batches leave room for updates.
    inflight_batches: int = 8


def cost(line: common_pb2.LogLine) -> int:
    return len(line.text) + LINE_OVERHEAD


class _Line(NamedTuple):
    """A line owed, as plain Python: a job printing 200,000 lines a second makes each one a tuple, and
    a protobuf message only once, in the batch that is sent (agent_pb2.LogBatch)."""

    seq: int
    stream: int
    text: str
    time_ns: int
    cost: int


def _to_proto(line: _Line) -> common_pb2.LogLine:
    return common_pb2.LogLine(seq=line.seq, stream=line.stream, text=line.text, time_ns=line.time_ns)  # type: ignore[arg-type]


def _from_proto(line: common_pb2.LogLine) -> _Line:
    return _Line(line.seq, line.stream, line.text, line.time_ns, cost(line))


@dataclass
class _JobLog:
    next_seq: int = 1
    mem: deque[_Line] = field(default_factory=deque)  # unacked, oldest first, before the spool's
    mem_bytes: int = 0
    sent_upto: int = 0  # highest seq written to the current stream
    acked_upto: int = 0  # highest seq the coordinator acknowledged
    inflight_bytes: int = 0  # of lines in mem with seq <= sent_upto
    # Lines beyond memory, in order: `overflow` (not yet written), then what is being written, then the spool.
    overflow: list[_Line] = field(default_factory=list)
    spilled: int = 0  # lines in overflow, being written or on disk
    spilled_bytes: int = 0
    on_disk: int = 0  # lines in the spool
    spool: Spool | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one spool operation at a time
    throttled_before: bool = False
    spool_failed: bool = False

    @property
    def owed_bytes(self) -> int:
        return self.mem_bytes + self.spilled_bytes


class Outbox:
    def __init__(
        self,
        max_lines_per_message: int = 5000,
        max_bytes_per_message: int = 1 << 20,
        spool_dir: Path | None = None,
        bounds: OutboxBounds = OutboxBounds(),
    ) -> None:
        # Far below gRPC's 64 MiB message limit, whatever the lines' length (up to 64 KiB each), and small
        # enough that the coordinator stores one batch quickly: a heartbeat written after it waits little.
        self.max_lines = max_lines_per_message
        self.max_bytes = max_bytes_per_message
        self.spool_dir = spool_dir  # None: no spool, lines stay in memory up to job_bytes
        self.bounds = bounds
        self._logs: dict[str, _JobLog] = {}
        self._updates: dict[str, list[tuple[agent_pb2.JobUpdate, bool]]] = {}  # job -> [(update, sent)]
        self._finished: set[str] = set()  # jobs that will produce no more lines
        self._mem_bytes = 0  # all jobs' lines in memory
        self._owed_bytes = 0  # all jobs' lines, memory and disk
        self._inflight_bytes = 0
        # The log batches written to the current stream and not yet acknowledged, oldest first: each one's
        # (job, last seq) pairs (`inflight_batches`).
        self._batches: deque[tuple[tuple[str, int], ...]] = deque()
        self._background: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()
        # Whether the last batch taken was cut by the batch's bounds (more lines were ready to go).
        self.last_batch_full = False
        self._room = asyncio.Event()  # set whenever an acknowledgement frees something

    # ---- producers ---------------------------------------------------------------------------
    def add_line(self, job_id: str, stream: common_pb2.LogStream.ValueType, text: str) -> None:
        self.add_lines(job_id, stream, [text])

    def add_lines(self, job_id: str, stream: common_pb2.LogStream.ValueType, texts: list[str]) -> None:
        """Lines read together (one chunk of the job's output): one timestamp, the time they were read."""
        if not texts:
            return
        jl = self._logs.setdefault(job_id, _JobLog())
        now = time.time_ns()
        seq = jl.next_seq
        spool = self.spool_dir is not None
        for text in texts:
            n = len(text) + LINE_OVERHEAD
            line = _Line(seq, stream, text, now, n)
            seq += 1
            self._owed_bytes += n
            if spool and (jl.spilled or not self._memory_room(jl, n)):
                jl.overflow.append(line)  # written to the spool by room() or refill()
                jl.spilled += 1
                jl.spilled_bytes += n
            else:
                jl.mem.append(line)
                jl.mem_bytes += n
                self._mem_bytes += n
        jl.next_seq = seq
        self.wake.set()

    def add_update(self, update: agent_pb2.JobUpdate) -> None:
        if not update.time_ns:
            update.time_ns = time.time_ns()
        self._updates.setdefault(update.job_id, []).append((update, False))
        self.wake.set()

    async def room(self, job_id: str) -> None:
        """Spools the job's overflow, then returns once the job may add more lines (the job's reader
        awaits this before reading on: back-pressure, not loss)."""
        jl = self._logs.get(job_id)
        if jl is None:
            return
        if jl.overflow:
            await self._whole(self._settle(job_id, jl))
        if not self._over_bounds(jl):
            return
        # Said once per job: a job printing faster than the coordinator stores would fill the agent's log.
        (log.debug if jl.throttled_before else log.info)(
            "job %s: its output waits for the coordinator (%d bytes owed by the job, %d by all jobs)",
            job_id,
            jl.owed_bytes,
            self._owed_bytes,
        )
        jl.throttled_before = True
        while self._over_bounds(jl):
            self._room.clear()
            await self._room.wait()

    def throttled(self, job_id: str) -> bool:
        """Whether the job's output waits for the coordinator's acknowledgements now."""
        jl = self._logs.get(job_id)
        return jl is not None and self._over_bounds(jl)

    def _over_bounds(self, jl: _JobLog) -> bool:
        return jl.owed_bytes >= self.bounds.job_bytes or self._owed_bytes >= self.bounds.total_bytes

    def _memory_room(self, jl: _JobLog, n: int) -> bool:
        if not jl.mem:  # always one line, however long: the job can make progress
            return True
        return jl.mem_bytes + n <= self.bounds.job_memory_bytes and self._mem_bytes + n <= self.bounds.memory_bytes

    async def _settle(self, job_id: str, jl: _JobLog) -> None:
        """Writes the job's overflow to its spool (off the event loop)."""
        if not jl.overflow or self.spool_dir is None:
            return
        async with jl.lock:
            batch, jl.overflow = jl.overflow, []
            if not batch:
                return
            if jl.spool is None:
                jl.spool = Spool(self.spool_dir / job_id)
            spool = jl.spool
            try:
                await asyncio.to_thread(lambda: spool.append([_to_proto(line) for line in batch]))
            except OSError as e:  # a full disk: the lines stay in memory (the job's bound still holds)
                jl.overflow[:0] = batch
                if not jl.spool_failed:
                    log.warning(
                        "job %s: spooling log lines to %s failed (kept in memory): %s", job_id, self.spool_dir, e
                    )
                jl.spool_failed = True
                return
            jl.on_disk += len(batch)

    async def refill(self) -> None:
        """Brings spooled lines back into memory where acknowledgements made room (oldest first)."""
        for job_id, jl in list(self._logs.items()):
            if jl.spilled:
                await self._whole(self._settle(job_id, jl))  # keeps the overflow (memory) small meanwhile
                await self._whole(self._refill_job(jl))

    async def _whole(self, operation: Coroutine[None, None, None]) -> None:
        """Runs a spool operation to its end even if the caller is cancelled (a session that ends, a
        stopping job): lines read from or written to disk are always accounted for, never dropped."""
        task = asyncio.create_task(operation)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        await asyncio.shield(task)

    async def _refill_job(self, jl: _JobLog) -> None:
        async with jl.lock:
            room = min(self.bounds.job_memory_bytes - jl.mem_bytes, self.bounds.memory_bytes - self._mem_bytes)
            if jl.mem:
                if room <= 0:
                    return
            else:
                room = max(room, 1)
            lines: list[_Line] = []
            if jl.on_disk and jl.spool is not None:
                spool = jl.spool
                lines = await asyncio.to_thread(lambda: [_from_proto(line) for line in spool.read(room)])
                jl.on_disk -= len(lines)
            if not jl.on_disk and jl.overflow:  # the spool is empty: what was never written comes next
                take = 0
                budget = room - sum(line.cost for line in lines)
                while take < len(jl.overflow) and (budget > 0 or not (lines or take)):
                    budget -= jl.overflow[take].cost
                    take += 1
                lines.extend(jl.overflow[:take])
                del jl.overflow[:take]
            moved = sum(line.cost for line in lines)
            jl.mem.extend(lines)
            jl.mem_bytes += moved
            self._mem_bytes += moved
            jl.spilled -= len(lines)
            jl.spilled_bytes -= moved

    # ---- the sender --------------------------------------------------------------------------
    def take(self) -> agent_pb2.AgentMessage | None:
        """Log lines and then the updates they allow, in one message (see take_logs, take_control)."""
        msg = self.take_logs() or agent_pb2.AgentMessage()
        control = self.take_control()
        if control is not None:
            msg.updates.extend(control.updates)
        return msg if msg.logs or msg.updates else None

    def take_logs(self) -> agent_pb2.AgentMessage | None:
        """The next log batch: unsent lines in memory, bounded in count and bytes (at least one line),
        none while `inflight_bytes` or `inflight_batches` wait for acknowledgement."""
        if self._inflight_bytes >= self.bounds.inflight_bytes or len(self._batches) >= self.bounds.inflight_batches:
            return None
        msg = agent_pb2.AgentMessage()
        budget, byte_budget = self.max_lines, self.max_bytes
        self.last_batch_full = False
        for job_id, jl in self._logs.items():
            if budget <= 0 or byte_budget <= 0:
                break
            # mem holds consecutive seqs: skip the ones already written to this stream.
            start = max(jl.sent_upto - jl.mem[0].seq + 1, 0) if jl.mem else 0
            lines: list[_Line] = []
            for ln in itertools.islice(jl.mem, start, start + budget):
                n = ln.cost
                if lines and n > byte_budget:
                    break
                lines.append(ln)
                byte_budget -= n
            if lines:
                sent = sum(ln.cost for ln in lines)
                jl.inflight_bytes += sent
                self._inflight_bytes += sent
                add = msg.logs.add(job_id=job_id).lines.add  # each line made a message once, in place
                for ln in lines:
                    add(seq=ln.seq, stream=ln.stream, text=ln.text, time_ns=ln.time_ns)
                jl.sent_upto = lines[-1].seq
                budget -= len(lines)
        self.last_batch_full = budget <= 0 or byte_budget <= LINE_OVERHEAD
        if not msg.logs:
            return None
        self._batches.append(tuple((b.job_id, b.lines[-1].seq) for b in msg.logs))
        return msg

    def take_control(self) -> agent_pb2.AgentMessage | None:
        """Job updates not yet sent; a final one only once all of its job's lines are sent."""
        msg = agent_pb2.AgentMessage()
        for job_id, items in self._updates.items():
            pending = self._logs.get(job_id)
            lines_pending = pending is not None and pending.sent_upto < pending.next_seq - 1
            for i, (u, sent) in enumerate(items):
                if sent or (u.status in FINAL and lines_pending):
                    continue
                msg.updates.append(u)
                items[i] = (u, True)
        return msg if msg.updates else None

    # ---- acknowledgements --------------------------------------------------------------------
    def ack_logs(self, job_id: str, seq: int) -> None:
        jl = self._logs.get(job_id)
        if jl is not None:
            jl.acked_upto = max(jl.acked_upto, seq)
            self._drop_upto(jl, seq)
            self._forget_if_done(job_id)
        self._settle_batches()

    def _settle_batches(self) -> None:
        """Batches whose every line is acknowledged (or whose job is forgotten) are no longer in flight."""
        settled = False
        while self._batches and all(
            (jl := self._logs.get(job_id)) is None or jl.acked_upto >= seq for job_id, seq in self._batches[0]
        ):
            self._batches.popleft()
            settled = True
        if settled:
            self.wake.set()  # the send loop may take the next batch

    def ack_update(self, job_id: str, status: int) -> None:
        items = self._updates.get(job_id)
        if not items:
            return
        items[:] = [(u, s) for u, s in items if u.status != status]
        if not items:
            del self._updates[job_id]
        self._forget_if_done(job_id)

    def _forget_if_done(self, job_id: str) -> None:
        jl = self._logs.get(job_id)
        if job_id not in self._finished or job_id in self._updates or (jl is not None and (jl.mem or jl.spilled)):
            return
        self._logs.pop(job_id, None)
        self._finished.discard(job_id)
        if jl is not None and jl.spool is not None:
            task = asyncio.create_task(asyncio.to_thread(jl.spool.remove))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def mark_finished(self, job_id: str) -> None:
        """The job will produce no more lines; its state can go once everything is acknowledged."""
        self._finished.add(job_id)
        self._forget_if_done(job_id)

    def on_new_stream(self, positions: dict[str, int]) -> None:
        """A new stream: the coordinator has lines up to `positions`; everything else is re-sent."""
        for job_id, jl in self._logs.items():
            if job_id in positions:
                jl.acked_upto = max(jl.acked_upto, positions[job_id])
                self._drop_upto(jl, positions[job_id])
            jl.sent_upto = jl.mem[0].seq - 1 if jl.mem else jl.next_seq - 1 - jl.spilled
            self._inflight_bytes -= jl.inflight_bytes
            jl.inflight_bytes = 0
        self._batches.clear()  # nothing is in flight on a new stream
        for items in self._updates.values():
            items[:] = [(u, False) for u, _ in items]
        self.wake.set()

    def jobs_with_pending(self) -> set[str]:
        """Jobs the coordinator has not heard the end of: they count as active on reconnect."""
        return set(self._updates) | {j for j, jl in self._logs.items() if jl.mem or jl.spilled}

    def memory_bytes(self) -> int:
        """Lines held in memory now (estimated), for tests and the agent's own accounting."""
        return self._mem_bytes

    def owed_bytes(self) -> int:
        return self._owed_bytes

    def _drop_upto(self, jl: _JobLog, seq: int) -> None:
        freed = 0
        while jl.mem and jl.mem[0].seq <= seq:
            line = jl.mem.popleft()
            n = line.cost
            freed += n
            if line.seq <= jl.sent_upto and jl.inflight_bytes > 0:
                jl.inflight_bytes -= n
                self._inflight_bytes -= n
        if freed:
            jl.mem_bytes -= freed
            self._mem_bytes -= freed
            self._owed_bytes -= freed
            self._room.set()
            self.wake.set()  # memory freed: spooled lines can come back and be sent
