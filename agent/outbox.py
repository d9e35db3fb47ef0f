"""What the agent owes the coordinator: log lines and job updates, kept until acknowledged.

Each job's lines carry consecutive sequence numbers from 1. A line is dropped only once the
coordinator acknowledges it; after a reconnect everything unacknowledged is sent again from the
position the coordinator reports, so no line is lost and none is stored twice. A job's final update
is sent only after all of its lines.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from dstack.protos.v1 import agent_pb2, common_pb2

JS = common_pb2.JobStatus
FINAL = (JS.JOB_STATUS_DONE, JS.JOB_STATUS_FAILED, JS.JOB_STATUS_STOPPED)


@dataclass
class _JobLog:
    next_seq: int = 1
    unacked: deque[common_pb2.LogLine] = field(default_factory=deque)
    sent_upto: int = 0  # highest seq written to the current stream


class Outbox:
    def __init__(self, max_lines_per_message: int = 5000, max_bytes_per_message: int = 4 << 20) -> None:
        # Far below gRPC's 64 MiB message limit, whatever the lines' length (up to 64 KiB each).
        self.max_lines = max_lines_per_message
        self.max_bytes = max_bytes_per_message
        self._logs: dict[str, _JobLog] = {}
        self._updates: dict[str, list[tuple[agent_pb2.JobUpdate, bool]]] = {}  # job -> [(update, sent)]
        self._finished: set[str] = set()  # jobs that will produce no more lines
        self.wake = asyncio.Event()

    # ---- producers ---------------------------------------------------------------------------
    def add_line(self, job_id: str, stream: common_pb2.LogStream.ValueType, text: str) -> None:
        jl = self._logs.setdefault(job_id, _JobLog())
        jl.unacked.append(common_pb2.LogLine(seq=jl.next_seq, stream=stream, text=text, time_ns=time.time_ns()))
        jl.next_seq += 1
        self.wake.set()

    def add_update(self, update: agent_pb2.JobUpdate) -> None:
        if not update.time_ns:
            update.time_ns = time.time_ns()
        self._updates.setdefault(update.job_id, []).append((update, False))
        self.wake.set()

    # ---- the sender --------------------------------------------------------------------------
    def take(self) -> agent_pb2.AgentMessage | None:
        """The next message to write: unsent lines (bounded in count and bytes, at least one line),
        then updates whose lines are all sent."""
        msg = agent_pb2.AgentMessage()
        budget, byte_budget = self.max_lines, self.max_bytes
        for job_id, jl in self._logs.items():
            if budget <= 0 or byte_budget <= 0:
                break
            # unacked holds consecutive seqs: skip the ones already written to this stream.
            start = max(jl.sent_upto - jl.unacked[0].seq + 1, 0) if jl.unacked else 0
            lines: list[common_pb2.LogLine] = []
            for ln in itertools.islice(jl.unacked, start, start + budget):
                if lines and len(ln.text) > byte_budget:
                    break
                lines.append(ln)
                byte_budget -= len(ln.text) + 32
            if lines:
                msg.logs.append(agent_pb2.LogBatch(job_id=job_id, lines=lines))
                jl.sent_upto = lines[-1].seq
                budget -= len(lines)
        for job_id, items in self._updates.items():
            pending = self._logs.get(job_id)
            lines_pending = pending is not None and pending.sent_upto < pending.next_seq - 1
            for i, (u, sent) in enumerate(items):
                if sent or (u.status in FINAL and lines_pending):
                    continue
                msg.updates.append(u)
                items[i] = (u, True)
        if not msg.logs and not msg.updates:
            return None
        return msg

    # ---- acknowledgements --------------------------------------------------------------------
    def ack_logs(self, job_id: str, seq: int) -> None:
        jl = self._logs.get(job_id)
        if jl is None:
            return
        _drop_upto(jl, seq)
        self._forget_if_done(job_id)

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
        if job_id not in self._finished or job_id in self._updates or (jl is not None and jl.unacked):
            return
        self._logs.pop(job_id, None)
        self._finished.discard(job_id)

    def mark_finished(self, job_id: str) -> None:
        """The job will produce no more lines; its state can go once everything is acknowledged."""
        self._finished.add(job_id)
        self._forget_if_done(job_id)

    def on_new_stream(self, positions: dict[str, int]) -> None:
        """A new stream: the coordinator has lines up to `positions`; everything else is re-sent."""
        for job_id, jl in self._logs.items():
            if job_id in positions:
                _drop_upto(jl, positions[job_id])
            jl.sent_upto = jl.unacked[0].seq - 1 if jl.unacked else jl.next_seq - 1
        for items in self._updates.values():
            items[:] = [(u, False) for u, _ in items]
        self.wake.set()

    def jobs_with_pending(self) -> set[str]:
        """Jobs the coordinator has not heard the end of: they count as active on reconnect."""
        return set(self._updates) | {j for j, jl in self._logs.items() if jl.unacked}


def _drop_upto(jl: _JobLog, seq: int) -> None:
    while jl.unacked and jl.unacked[0].seq <= seq:
        jl.unacked.popleft()
