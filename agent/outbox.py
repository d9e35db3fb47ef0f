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
bounded too, so a heartbeat written now waits behind little. Messages in flight are bounded in number
as well (log batches, and messages of updates): the coordinator reads a stream in order and holds only
a few of its messages unhandled, and a heartbeat behind more would wait unread.
"""

from __future__ import annotations

import asyncio
import bisect
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
# The agent's `Outbox.short_batches_inflight`: a short log batch goes only when none is unacknowledged.
SHORT_BATCHES_INFLIGHT = 1
# The agent's `Outbox.short_batch_gap_s`: at most one short batch per 2 ms (500 a second). The coordinator
# spends about 0.4-1.5 ms of CPU per batch whatever its size (one trip to its DB thread, an ack, a
# follower's read; more under load): acknowledgements alone would let a steadily printing job send one
# batch per round trip, keeping a fast coordinator's log path always busy. Not a wait for a lone line:
# it goes at once unless a short batch went in the last 2 ms.
SHORT_BATCH_GAP_S = 0.002


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
    # Messages of job updates sent and not yet acknowledged: no more beyond it; the updates that wait go
    # together in the next one. They are read in order with the log batches, ahead of any heartbeat behind
    # them: many jobs ending one by one while the store stalled sent one message each, filled the
    # coordinator's inbox and left heartbeats unread. 8 log batches and 4 of these stay below its 16,
    # with room for a heartbeat that carries the inventory (tests/unit/test_outbox.py checks the sum).
    inflight_updates: int = 4


def cost(line: common_pb2.LogLine) -> int:
    return len(line.text) + LINE_OVERHEAD


def block_cost(text: str, count: int) -> int:
    """What `count` lines joined by "\n" in `text` cost: the sum of their costs as separate lines."""
    return len(text) - (count - 1) + LINE_OVERHEAD * count


class _Block(NamedTuple):
    """Lines of one job's stream read together, as plain Python: seqs first .. first + n_lines - 1, their
    texts joined by "\n", one timestamp. A job printing 200,000 lines a second costs the outbox a few
    operations per block (one read of its output), not per line; a block becomes one `LogBlock` in the
    batch that is sent, or LogLines for a coordinator that reads only those."""

    first: int
    n_lines: int
    stream: int
    text: str
    time_ns: int
    cost: int

    @property
    def last(self) -> int:
        return self.first + self.n_lines - 1


def _split(b: _Block, k: int) -> tuple[_Block, _Block]:
    """The block's first k lines (0 < k < n_lines) and the rest."""
    parts = b.text.split("\n", k)
    head = "\n".join(parts[:k])
    n = block_cost(head, k)
    return (
        _Block(b.first, k, b.stream, head, b.time_ns, n),
        _Block(b.first + k, b.n_lines - k, b.stream, parts[k], b.time_ns, b.cost - n),
    )


def _fitting(b: _Block, room: int) -> int:
    """How many of the block's first lines cost at most `room` (b.cost > room)."""
    ends = list(itertools.accumulate(map(len, b.text.split("\n"))))  # text up to each line's end
    return bisect.bisect_right(range(1, b.n_lines + 1), room, key=lambda k: ends[k - 1] + LINE_OVERHEAD * k)


def _to_proto(b: _Block) -> common_pb2.LogBlock:
    return common_pb2.LogBlock(first_seq=b.first, count=b.n_lines, stream=b.stream, text=b.text, time_ns=b.time_ns)  # type: ignore[arg-type]


def _from_proto(b: common_pb2.LogBlock) -> _Block:
    return _Block(b.first_seq, b.count, b.stream, b.text, b.time_ns, block_cost(b.text, b.count))


@dataclass
class _JobLog:
    next_seq: int = 1
    mem: deque[_Block] = field(default_factory=deque)  # unacked, oldest first, before the spool's
    mem_bytes: int = 0
    sent_upto: int = 0  # highest seq written to the current stream (always a block's last, or before mem)
    sent_blocks: int = 0  # the blocks at the head of mem written to the current stream
    acked_upto: int = 0  # highest seq the coordinator acknowledged
    inflight_bytes: int = 0  # of lines in mem with seq <= sent_upto
    inflight_lines: int = 0  # lines in mem with seq <= sent_upto
    # Lines beyond memory, in order: `overflow` (not yet written), then what is being written, then the spool.
    overflow: list[_Block] = field(default_factory=list)
    spilled: int = 0  # lines in overflow, being written or on disk
    spilled_bytes: int = 0
    on_disk: int = 0  # blocks in the spool
    spool: Spool[common_pb2.LogBlock] | None = None
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
        short_batches_inflight: int | None = None,
        short_batch_gap_s: float = 0.0,
    ) -> None:
        # Far below gRPC's 64 MiB message limit, whatever the lines' length (up to 64 KiB each), and small
        # enough that the coordinator stores one batch quickly: a heartbeat written after it waits little.
        self.max_lines = max_lines_per_message
        self.max_bytes = max_bytes_per_message
        self.spool_dir = spool_dir  # None: no spool, lines stay in memory up to job_bytes
        self.bounds = bounds
        self._logs: dict[str, _JobLog] = {}
        self._updates: dict[str, list[tuple[agent_pb2.JobUpdate, bool]]] = {}  # job -> [(update, sent)]
        # The messages of updates written to the current stream and not yet acknowledged: each one's
        # (job, status) pairs (`inflight_updates`).
        # Kept as counters, so an acknowledgement costs the same however many updates are in flight: each
        # message's (job, status) pairs not yet acknowledged, by message number, and the messages holding
        # each pair.
        self._update_msgs: dict[int, int] = {}
        self._update_msgs_of: dict[tuple[str, int], list[int]] = {}
        self._update_msg_numbers = itertools.count()
        self._finished: set[str] = set()  # jobs that will produce no more lines
        self._mem_bytes = 0  # all jobs' lines in memory
        # All jobs' lines in memory, and those of them written to the current stream: what is ready to go is
        # the difference, known without a look at every job (`_full_batch_unsent`, on each read of output).
        self._mem_lines = 0
        self._inflight_lines = 0
        self._owed_bytes = 0  # all jobs' lines, memory and disk
        self._inflight_bytes = 0
        # The log batches written to the current stream and not yet acknowledged, oldest first: each one's
        # (job, last seq) pairs (`inflight_batches`).
        self._batches: deque[tuple[tuple[str, int], ...]] = deque()
        self._background: set[asyncio.Task[None]] = set()
        # Set when the send loop (agent/connection.py) has something to take: a job update, lines it may
        # send now (see take_logs), an acknowledgement that frees the window or memory.
        self.wake = asyncio.Event()
        # Set with `wake` by what must go before anything else waits: job updates, a disk verdict.
        self.urgent = asyncio.Event()
        # Whether the last batch taken was cut by the batch's bounds (more lines were ready to go).
        self.last_batch_full = False
        # Adaptive batching, clocked by acknowledgements, with no timer: a batch shorter than the bounds goes
        # only while fewer than this many log batches wait for their acknowledgement. A lone line goes at
        # once (nothing is in flight); under load the lines read while a batch is being stored go together
        # in the next one when its acknowledgement comes, so batches grow as the coordinator slows, and a
        # steady job sends one batch per round trip rather than one per read of its output. The agent
        # uses SHORT_BATCHES_INFLIGHT; None: as many as `inflight_batches` (no gating of short batches).
        # `short_batch_gap_s`: and at most one short batch per this long (SHORT_BATCH_GAP_S).
        self.short_batches_inflight = (
            bounds.inflight_batches if short_batches_inflight is None else short_batches_inflight
        )
        self.short_batch_gap_s = short_batch_gap_s
        self._short_not_before = 0.0  # monotonic: no short batch before (the gap after the last one)
        # Whether the coordinator of the current stream stores LogBatch.blocks (HelloAck.log_blocks); if
        # not, each line goes as a LogLine, as to any coordinator before them.
        self.blocks = False
        self._room = asyncio.Event()  # set whenever an acknowledgement frees something

    # ---- producers ---------------------------------------------------------------------------
    def add_line(self, job_id: str, stream: common_pb2.LogStream.ValueType, text: str) -> None:
        self.add_lines(job_id, stream, [text])

    def add_lines(self, job_id: str, stream: common_pb2.LogStream.ValueType, texts: list[str]) -> None:
        """Lines read together (one chunk of the job's output): one timestamp, the time they were read.
        A text holding "\n" counts as the lines it shows (a follower prints them the same)."""
        if texts:
            self.add_text(job_id, stream, "\n".join(texts))

    def add_text(self, job_id: str, stream: common_pb2.LogStream.ValueType, text: str) -> None:
        """The lines of `text` (split at "\n", none without its text: "" is one empty line), read together:
        one block, one timestamp (the time they were read)."""
        jl = self._logs.setdefault(job_id, _JobLog())
        count = text.count("\n") + 1
        block = _Block(jl.next_seq, count, int(stream), text, time.time_ns(), block_cost(text, count))
        jl.next_seq += count
        self._owed_bytes += block.cost
        fits = (
            jl.mem_bytes + block.cost <= self.bounds.job_memory_bytes
            and self._mem_bytes + block.cost <= self.bounds.memory_bytes
        )
        if self.spool_dir is not None and (jl.spilled or not fits):
            # As much as memory holds (at least one line while the job has none there), the rest to the
            # spool, written by room() or refill().
            k = 0 if jl.spilled else self._fitting_in_memory(jl, block)
            if k >= block.n_lines:
                self._to_memory(jl, block)
                self._lines_added()
                return
            if k:
                head, block = _split(block, k)
                self._to_memory(jl, head)
            jl.overflow.append(block)
            jl.spilled += block.n_lines
            jl.spilled_bytes += block.cost
        else:
            self._to_memory(jl, block)
        self._lines_added()

    def _lines_added(self) -> None:
        """Wakes the send loop if it may take a batch now: not for each read of a job printing while its
        last batch is being stored (its acknowledgement wakes the loop, and takes them all at once)."""
        if len(self._batches) < self.short_batches_inflight or self._full_batch_unsent():
            self.wake.set()

    def _full_batch_unsent(self) -> bool:
        """Whether the lines in memory not yet sent fill a batch (in count or bytes)."""
        lines = self._mem_lines - self._inflight_lines
        size = self._mem_bytes - self._inflight_bytes
        return lines >= self.max_lines or size >= self.max_bytes - LINE_OVERHEAD

    def _to_memory(self, jl: _JobLog, block: _Block) -> None:
        jl.mem.append(block)
        jl.mem_bytes += block.cost
        self._mem_bytes += block.cost
        self._mem_lines += block.n_lines

    def _fitting_in_memory(self, jl: _JobLog, block: _Block) -> int:
        """How many of the block's first lines memory holds now (the block as a whole does not fit)."""
        room = min(self.bounds.job_memory_bytes - jl.mem_bytes, self.bounds.memory_bytes - self._mem_bytes)
        k = _fitting(block, room) if room > 0 else 0
        return max(k, 0 if jl.mem else 1)  # always one line, however long: the job can make progress

    def add_update(self, update: agent_pb2.JobUpdate) -> None:
        if not update.time_ns:
            update.time_ns = time.time_ns()
        self._updates.setdefault(update.job_id, []).append((update, False))
        self.wake.set()
        self.urgent.set()

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

    async def _settle(self, job_id: str, jl: _JobLog) -> None:
        """Writes the job's overflow to its spool (off the event loop)."""
        if not jl.overflow or self.spool_dir is None:
            return
        async with jl.lock:
            batch, jl.overflow = jl.overflow, []
            if not batch:
                return
            if jl.spool is None:
                jl.spool = Spool(self.spool_dir / job_id, parse=common_pb2.LogBlock.FromString)
            spool = jl.spool
            try:
                await asyncio.to_thread(lambda: spool.append([_to_proto(block) for block in batch]))
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
            blocks: list[_Block] = []
            if jl.on_disk and jl.spool is not None:
                spool = jl.spool
                # By their cost, as memory counts them (a block's serialized size is far less): memory
                # goes over its bound by at most one block, one read of the job's output.
                records = await asyncio.to_thread(lambda: spool.read(room, lambda b: block_cost(b.text, b.count)))
                blocks = [_from_proto(b) for b in records]
                jl.on_disk -= len(blocks)
            if not jl.on_disk and jl.overflow:  # the spool is empty: what was never written comes next
                take = 0
                budget = room - sum(b.cost for b in blocks)
                while take < len(jl.overflow) and (budget > 0 or not (blocks or take)):
                    budget -= jl.overflow[take].cost
                    take += 1
                blocks.extend(jl.overflow[:take])
                del jl.overflow[:take]
            moved = sum(b.cost for b in blocks)
            lines = sum(b.n_lines for b in blocks)
            jl.mem.extend(blocks)
            jl.mem_bytes += moved
            self._mem_bytes += moved
            self._mem_lines += lines
            jl.spilled -= lines
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
        none while `inflight_bytes` or `inflight_batches` wait for acknowledgement; a short one (fewer
        lines than fill a batch) only while fewer than `short_batches_inflight` batches do."""
        if self._inflight_bytes >= self.bounds.inflight_bytes or len(self._batches) >= self.bounds.inflight_batches:
            return None
        if len(self._batches) >= self.short_batches_inflight or (
            self.short_batch_gap_s and time.monotonic() < self._short_not_before
        ):
            if not self._full_batch_unsent():
                return None
        msg = agent_pb2.AgentMessage()
        budget, byte_budget = self.max_lines, self.max_bytes
        in_batch: list[tuple[str, int]] = []  # (job, last seq) of each job in this batch
        self.last_batch_full = False
        for job_id, jl in self._logs.items():
            if budget <= 0 or byte_budget <= 0:
                break
            # mem holds consecutive seqs: skip the blocks already written to this stream.
            blocks: list[_Block] = []
            at = jl.sent_blocks
            for b in itertools.islice(jl.mem, jl.sent_blocks, None):
                if budget <= 0 or byte_budget <= 0:
                    break
                if b.n_lines > budget or b.cost > byte_budget:  # the batch ends inside this block
                    k = min(budget, b.n_lines, _fitting(b, byte_budget) if b.cost > byte_budget else b.n_lines)
                    if k <= 0 and not blocks:
                        k = 1  # at least one line per job, however long
                    if k <= 0:
                        break
                    if k < b.n_lines:  # split where it is, so what is sent is always whole blocks of mem
                        b, rest = _split(b, k)
                        jl.mem[at] = b
                        jl.mem.insert(at + 1, rest)
                    blocks.append(b)
                    budget -= b.n_lines
                    byte_budget -= b.cost
                    break
                blocks.append(b)
                at += 1
                budget -= b.n_lines
                byte_budget -= b.cost
            if blocks:
                sent = sum(b.cost for b in blocks)
                jl.inflight_bytes += sent
                self._inflight_bytes += sent
                sent_lines = sum(b.n_lines for b in blocks)
                jl.inflight_lines += sent_lines
                self._inflight_lines += sent_lines
                batch = msg.logs.add(job_id=job_id)
                if self.blocks:
                    add_block = batch.blocks.add
                    for b in blocks:
                        add_block(first_seq=b.first, count=b.n_lines, stream=b.stream, text=b.text, time_ns=b.time_ns)
                else:  # a coordinator that reads only LogLines: each line made a message once, in place
                    add = batch.lines.add
                    for b in blocks:
                        for i, text in enumerate(b.text.split("\n")):
                            add(seq=b.first + i, stream=b.stream, text=text, time_ns=b.time_ns)
                jl.sent_upto = blocks[-1].last
                jl.sent_blocks += len(blocks)
                in_batch.append((job_id, jl.sent_upto))
        self.last_batch_full = budget <= 0 or byte_budget <= LINE_OVERHEAD
        if not in_batch:
            return None
        if not self.last_batch_full and self.short_batch_gap_s:
            self._short_not_before = time.monotonic() + self.short_batch_gap_s
        self._batches.append(tuple(in_batch))
        return msg

    def short_batch_at(self) -> float | None:
        """When the gap after the last short batch ends (monotonic), if lines wait for it; else None."""
        if self.short_batch_gap_s and self._short_not_before > time.monotonic() and self._unsent():
            return self._short_not_before
        return None

    def _unsent(self) -> bool:
        return any(jl.mem and jl.mem[-1].last > jl.sent_upto for jl in self._logs.values())

    def take_control(self) -> agent_pb2.AgentMessage | None:
        """Job updates not yet sent, together in one message of at most `max_bytes` (at least one update: a
        final one carries its environment, up to a few hundred KiB); a final one only once all of its job's
        lines are sent; none while `inflight_updates` messages wait for acknowledgement."""
        if len(self._update_msgs) >= self.bounds.inflight_updates:
            return None
        msg = agent_pb2.AgentMessage()
        size = 0
        for job_id, items in self._updates.items():
            pending = self._logs.get(job_id)
            lines_pending = pending is not None and pending.sent_upto < pending.next_seq - 1
            for i, (u, sent) in enumerate(items):
                if sent or (u.status in FINAL and lines_pending):
                    continue
                n = u.ByteSize()
                if msg.updates and size + n > self.max_bytes:
                    break  # this job's later updates wait behind this one: its order is kept
                size += n
                msg.updates.append(u)
                items[i] = (u, True)
            if size >= self.max_bytes:
                break
        if not msg.updates:
            return None
        number = next(self._update_msg_numbers)
        pairs = {(u.job_id, int(u.status)) for u in msg.updates}
        self._update_msgs[number] = len(pairs)
        for pair in pairs:
            self._update_msgs_of.setdefault(pair, []).append(number)
        return msg

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
        self._settle_updates(job_id, status)

    def _settle_updates(self, job_id: str, status: int) -> None:
        """The job's updates of this status are acknowledged (each of them, sent or not, is gone): a message
        none of whose (job, status) pairs is left unacknowledged is no longer in flight."""
        settled = False
        for number in self._update_msgs_of.pop((job_id, int(status)), ()):
            left = self._update_msgs.get(number)
            if left is None:
                continue
            if left > 1:
                self._update_msgs[number] = left - 1
            else:
                del self._update_msgs[number]
                settled = True
        if settled:
            self.wake.set()  # the send loop may write the updates that waited
            self.urgent.set()

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

    def on_new_stream(self, positions: dict[str, int], blocks: bool = False) -> None:
        """A new stream: the coordinator has lines up to `positions`; everything else is re-sent (as
        LogBlocks if `blocks`: the coordinator stores them)."""
        self.blocks = blocks
        for job_id, jl in self._logs.items():
            if job_id in positions:
                jl.acked_upto = max(jl.acked_upto, positions[job_id])
                self._drop_upto(jl, positions[job_id])
            jl.sent_upto = jl.mem[0].first - 1 if jl.mem else jl.next_seq - 1 - jl.spilled
            jl.sent_blocks = 0
            self._inflight_bytes -= jl.inflight_bytes
            jl.inflight_bytes = 0
            self._inflight_lines -= jl.inflight_lines
            jl.inflight_lines = 0
        self._batches.clear()  # nothing is in flight on a new stream
        self._update_msgs.clear()
        self._update_msgs_of.clear()
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
        freed = freed_lines = 0
        while jl.mem and jl.mem[0].first <= seq:
            b = jl.mem[0]
            sent = b.last <= jl.sent_upto
            if b.last > seq:  # acknowledged in part (a position inside a block): the rest stays
                b, jl.mem[0] = _split(b, seq - b.first + 1)
                jl.sent_blocks += sent  # both parts were sent, or neither
            else:
                jl.mem.popleft()
            n = b.cost
            freed += n
            freed_lines += b.n_lines
            if sent:
                jl.sent_blocks -= 1
                if jl.inflight_bytes > 0:
                    jl.inflight_bytes -= n
                    self._inflight_bytes -= n
                    jl.inflight_lines -= b.n_lines
                    self._inflight_lines -= b.n_lines
        self._mem_lines -= freed_lines
        if freed:
            jl.mem_bytes -= freed
            self._mem_bytes -= freed
            self._owed_bytes -= freed
            self._room.set()
            self.wake.set()  # memory freed: spooled lines can come back and be sent
