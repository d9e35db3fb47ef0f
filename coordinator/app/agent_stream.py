"""One connected agent's stream: its hello, the messages it sends, the work pushed down to it.

The one use case here that keeps dstack.v1 messages (tests/unit/test_app_layer.py lists it): the
stream relays the agent protocol, which has one front end (gRPC) and whose messages the engine reads
and answers as they are (coordinator/engine.py: on_hello, on_message; hub.py queues them per agent).
Its contents are converted to domain values where they are stored (convert.log_batches_from_proto,
convert.job_updates_from_proto). The agent's unary calls (artifacts, grants, code) are plain:
coordinator/app/agent_link.py. Everything the agent sends passes coordinator/app/agent_scope.py
first: lines and updates of jobs that are not its own never reach the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from typing import Any

from dstack.coordinator.app import agent_scope
from dstack.coordinator.app.core import Core
from dstack.coordinator.convert import environment_from_proto
from dstack.coordinator.engine import Handling, UpdatesAnswer
from dstack.coordinator.hub import AgentConnection
from dstack.coordinator.model import UpdateAck
from dstack.coordinator.store.logs import batch_last_seq, batch_lines
from dstack.protos.v1 import agent_pb2, common_pb2

log = logging.getLogger("dstack.coordinator")
FINAL = frozenset({common_pb2.JOB_STATUS_DONE, common_pb2.JOB_STATUS_FAILED, common_pb2.JOB_STATUS_STOPPED})


# A message the store could not write because its disk refused (full, an I/O error) is handled again, after
# these waits (s), until it is stored: the stream stays up meanwhile.
REFUSED_WRITE_RETRY_S = (0.25, 2.0)


def refused_write(e: BaseException) -> bool:
    """The store's disk refused a write (SQLITE_FULL, SQLITE_IOERR...): it heals when space is back."""
    name = getattr(e, "sqlite_errorname", "") or ""
    return isinstance(e, sqlite3.OperationalError) and (name == "SQLITE_FULL" or name.startswith("SQLITE_IOERR"))


class Session:
    """One agent's stream: `start` with its hello, `receive` what it sends, `outgoing` what to send
    it, `close` when the stream ends."""

    def __init__(self, core: Core, agent_id: str) -> None:
        self.core = core
        self.agent_id = agent_id
        self._conn: AgentConnection | None = None
        self.epoch = 0  # this stream's session epoch (coordinator/fencing.py), from its hello
        # A message taken by the direct path (`receive_now`) and not answered yet (0 or 1), and a waiter for
        # its answer (`settled`): the messages read after it wait for it, in order.
        self._in_flight = 0
        self._settled: asyncio.Future[None] | None = None
        # The direct path's retries of a write the store's disk refused (nothing of it committed: ended by `close`).
        self._tasks: set[asyncio.Task[None]] = set()
        # The stream is ending (`end_input`): nothing read after that is handled, not even a message that was
        # already read and waited behind the direct path's (`settled`). The agent sends it again on its next
        # stream, once the one ahead of it is stored: its order is kept.
        self.ended = False

    async def start(self, hello: agent_pb2.AgentMessage) -> agent_pb2.CoordinatorMessage:
        engine = self.core.engine
        self._conn = engine.hub.attach(self.agent_id)
        # No await between attaching and holding: no scheduling pass sees the agent connected before
        # what it still runs is held (engine.on_hello narrows that to its stale attempts).
        self.epoch = engine.open_session(self.agent_id, hello.hello.active_job_ids)
        log.info("agent %s connected (session %d)", self.agent_id, self.epoch)
        hello, dropped = await self._screen(hello)
        reply = await self.core.engine.on_hello(self.agent_id, hello)
        reply.MergeFrom(dropped)
        return reply

    def heard(self) -> bool:
        """A message was read off this stream: the agent's lease is renewed at once, in memory, before the
        message waits for the database (coordinator/leases.py). A stale session's message renews nothing
        (False: `receive` ends the stream)."""
        engine = self.core.engine
        if not engine.sessions.is_current(self.agent_id, self.epoch):
            return False
        engine.heard(self.agent_id)
        return True

    @contextlib.contextmanager
    def unread(self) -> Iterator[None]:
        """While the stream is not read (its inbox is full: the messages before wait for the database),
        the agent's lease does not run out: what it sends meanwhile arrived, unread (engine.stream_unread).
        A stale session holds nothing."""
        engine = self.core.engine
        if not engine.sessions.is_current(self.agent_id, self.epoch):
            yield
            return
        engine.stream_unread(self.agent_id)
        try:
            yield
        finally:
            engine.stream_read_again(self.agent_id)

    def ack_beat(self, seq: int) -> None:
        """A heartbeat read on this (current) stream renewed the lease in memory (`heard`): its renewal is
        in force, so the agent may count its lease from when it sent it (self-fencing, `lease_ack`)."""
        if seq and self._conn is not None:
            self._conn.send(agent_pb2.CoordinatorMessage(lease_ack=seq))

    async def receive(self, msg: agent_pb2.AgentMessage, handling: Handling | None = None) -> None:
        if self.ended:  # a message ahead of it failed: not applied, not acknowledged
            return
        if not self.core.engine.sessions.is_current(self.agent_id, self.epoch):
            # The agent was lost or removed since this stream's hello, or opened a newer stream: what
            # comes on this one is stale, applied by nobody; the agent reconnects and says hello.
            log.warning(
                "agent %s: a message on its stale session %d refused; the stream ends", self.agent_id, self.epoch
            )
            self.end_input()
            return
        if msg.logs and not msg.updates:
            # Lines alone (a job printing steadily: hundreds of batches a second): whose lines they are is
            # checked on the DB thread in the same call as their insert, one trip there and back, not two
            # (each trip is a wake-up of two threads, and waits behind whatever else the DB thread does).
            dropped = agent_pb2.CoordinatorMessage()
            notes: list[tuple[str, str]] = []
            reply = await self.core.engine.on_message(
                self.agent_id,
                msg,
                screen_logs=lambda batches: self._screen_logs(batches, dropped, notes),
                handling=handling,
            )
            for job_id, what in notes:  # logged here, on the event loop (agent_scope keeps a count per agent)
                agent_scope.dropped(self.agent_id, "lines", what, job_id)
        elif msg.updates:
            # Updates (with lines or not): whose they are is checked in their report batch's own store call
            # (coordinator/reports.py), with the environments they carry; lines, in their insert's trip. No
            # trip to the DB thread for the check alone: an agent's job that runs briefly sends its RUNNING
            # and DONE in one message, so at a deep queue's drain that trip was one per job.
            dropped = agent_pb2.CoordinatorMessage()
            notes = []
            reply = await self.core.engine.on_message(
                self.agent_id,
                msg,
                screen_logs=(lambda batches: self._screen_logs(batches, dropped, notes)) if msg.logs else None,
                environments=await self._environments(msg),
                on_foreign=self._foreign_updates,
                handling=handling,
            )
            for job_id, what in notes:
                agent_scope.dropped(self.agent_id, "lines", what, job_id)
        else:
            msg, dropped = await self._screen(msg)
            reply = await self.core.engine.on_message(self.agent_id, msg, handling=handling)
        if reply is None:
            reply = dropped
        else:
            reply.MergeFrom(dropped)
        if reply.lease_ack and not self.core.engine.sessions.is_current(self.agent_id, self.epoch):
            # Lost while its heartbeat was being written (the lease check ends the session as soon as its
            # expiry returns, before this resumes): its jobs are requeued, no lease may be acknowledged.
            reply.lease_ack = 0
        if reply.log_acks or reply.update_acks or reply.lease_ack:
            self._send_acks(msg, reply)

    def receive_now(self, msg: agent_pb2.AgentMessage) -> bool:
        """The direct path, for the commonest message at a deep queue's drain: updates alone (a brief job's
        RUNNING and DONE), read while nothing of this stream's is being handled. Handled as `receive` would,
        without a task: its updates join their report batch now, and the batch's hand-back sends the acks
        (Engine.updates_then). No queue, no task step, no future of its own: about a quarter of the event
        loop's work per message (bench.drain). False: not such a message (nothing done: `receive` takes it).
        One at a time: the caller sends nothing this way, nor to `receive`, until `settled`."""
        assert self._in_flight == 0, "one message at a time"
        if self.ended:
            return True  # taken and dropped, as `receive` drops it: the agent sends it again
        if not msg.updates or msg.logs or msg.HasField("heartbeat") or msg.HasField("hello"):
            return False
        if not self.core.engine.sessions.is_current(self.agent_id, self.epoch):
            return False  # `receive` refuses it and ends the stream
        reported = [u for u in msg.updates if u.HasField("environment")]
        if any(u.environment.packages for u in reported):
            return False  # a `pip freeze` to sanitise: on a worker thread (`_environments`)
        environments = [(u.job_id, environment_from_proto(u.environment)) for u in reported]
        self._in_flight = 1
        self.core.engine.updates_then(
            self.agent_id, msg, environments, self._foreign_updates, lambda answer: self._answered(msg, answer)
        )
        return True

    def idle(self) -> bool:
        """No message taken by the direct path is waiting for its answer."""
        return not self._in_flight

    async def settled(self) -> None:
        """Returns once the message the direct path took (if any) is answered: the next one may be handled."""
        while self._in_flight:
            self._settled = asyncio.get_running_loop().create_future()
            await self._settled

    def _answered(self, msg: agent_pb2.AgentMessage, answer: UpdatesAnswer) -> None:
        """(Event loop, from the report batch's hand-back, or from the engine's follow-up of a requeue or a gang
        to settle, which is the engine's to finish and no task of ours: Engine._report) the direct path's message
        was applied, or failed. Its stream may have ended meanwhile: then nothing is sent (`_done`)."""
        if isinstance(answer, sqlite3.OperationalError) and refused_write(answer):
            self._spawn(self._stored_later(msg, answer))  # tried again until the disk takes it: `receive_stored`
        else:
            self._done(msg, answer)

    async def _stored_later(self, msg: agent_pb2.AgentMessage, refused: BaseException) -> None:
        try:
            await self.receive_stored(msg, refused)
        except Exception as e:
            self._done(msg, e)
        else:
            self._done(msg, agent_pb2.CoordinatorMessage())  # `receive` sent its acks

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send_acks(self, msg: agent_pb2.AgentMessage, reply: agent_pb2.CoordinatorMessage) -> None:
        """Sends the acknowledgements of `msg`. Those of updates alone, of which one ended a job (its capacity
        freed, a pass asked for), go with the agent's next message, most often that pass's assignment to it
        (Engine.ack_with_pass): one write for both. A lease's or lines' ack goes at once: the agent's self-fencing
        counts from the one, its window of lines in flight waits for the other."""
        conn = self._conn
        if conn is None:
            return
        if (
            not reply.lease_ack
            and not reply.log_acks
            and any(u.status in FINAL for u in msg.updates)
            and self.core.engine.ack_with_pass(conn, reply)
        ):
            return
        conn.send(reply)

    def _done(self, msg: agent_pb2.AgentMessage, answer: UpdatesAnswer) -> None:
        """The direct path's message is over: its acks sent, or (an error) the stream ends, as the handler's
        would (services/agent.py); the messages behind it may go on."""
        if isinstance(answer, agent_pb2.CoordinatorMessage):
            if answer.update_acks:
                self._send_acks(msg, answer)
        elif isinstance(answer, BaseException):  # its error (not a refused write): no ack; the agent sends it again
            log.error("agent %s stream failed", self.agent_id, exc_info=answer)
            self.end_input()
        else:  # the batch's call was cancelled: the coordinator stops
            self.end_input()
        self._in_flight = 0
        if self._settled is not None and not self._settled.done():
            self._settled.set_result(None)

    async def receive_stored(self, msg: agent_pb2.AgentMessage, refused: BaseException | None = None) -> None:
        """`receive`, again until the store writes it, while its disk refuses writes (the coordinator's disk
        full). The stream stays up: the agent's heartbeats behind this message are still read and acknowledged
        in memory (the agent keeps only a few messages unacknowledged, agent/outbox.py), so a full disk on the
        coordinator is a stalled store, not a lost stream: before, the stream failed, the agent's hello failed
        too, and every agent stopped its healthy jobs (self-fence) once the disk was full for longer than its
        deadline (issue 16's coordinator-disk-full chaos scenario). What `receive` did before the refused write
        is done again harmlessly: stored lines are cut from a resend, a repeated update changes nothing, and
        lines counted by a try whose later write failed are not counted again (`Handling`). `refused`: a first
        try's refusal (the direct path's, `receive_now`): the wait comes first."""
        wait, most = REFUSED_WRITE_RETRY_S
        said = False
        handling = Handling()
        while True:
            if refused is None:
                try:
                    await self.receive(msg, handling)
                    return
                except sqlite3.OperationalError as e:
                    if not refused_write(e):
                        raise
                    refused = e
            if not said:
                log.warning(
                    "agent %s: the store refuses writes (%s); its message waits, its stream stays",
                    self.agent_id,
                    refused,
                )
                said = True
            refused = None
            await asyncio.sleep(wait)
            wait = min(most, wait * 2)

    async def _environments(self, msg: agent_pb2.AgentMessage) -> list[tuple[str, dict[str, Any]]]:
        """The environments reported with updates, bounded and sanitised (coordinator/records.py), to keep
        as parts of their runs' records: their report batch writes those of the agent's own acting
        attempts only (coordinator/reports.py), with the updates."""
        reported = [u for u in msg.updates if u.HasField("environment")]
        if not reported:
            return []

        def convert() -> list[tuple[str, dict[str, Any]]]:
            return [(u.job_id, environment_from_proto(u.environment)) for u in reported]

        # A `pip freeze` (up to 256 KiB each) is sanitised on a worker thread; without one (most jobs:
        # a few short fields) there is nothing to keep off the event loop, and no trip to pay for.
        return await asyncio.to_thread(convert) if any(u.environment.packages for u in reported) else convert()

    def _foreign_updates(self, foreign: Sequence[UpdateAck]) -> None:
        """Updates of attempts that are not the agent's acting ones, dropped by their batch: a warning
        (at most one a minute per agent, agent_scope.dropped)."""
        for a in foreign:
            agent_scope.dropped(self.agent_id, "update", "a status update", a.job_id)

    async def _screen(self, msg: agent_pb2.AgentMessage) -> tuple[agent_pb2.AgentMessage, agent_pb2.CoordinatorMessage]:
        """The part of `msg` the agent may send (lines and updates of its own acting jobs: the check
        is agent_scope's), and the acknowledgements of what was dropped, so that an honest agent
        holding lines of a job it lost (its lease ran out) stops resending them."""
        acks = agent_pb2.CoordinatorMessage()
        if not msg.logs and not msg.updates:
            return msg, acks
        named = [b.job_id for b in msg.logs] + [u.job_id for u in msg.updates]
        current, ended = await agent_scope.reportable(self.core, self.agent_id, named)
        if current.issuperset(named):
            return msg, acks
        kept = agent_pb2.AgentMessage()
        kept.CopyFrom(msg)
        del kept.logs[:]
        del kept.updates[:]
        notes: list[tuple[str, str]] = []
        kept.logs.extend(_keep_logs(msg.logs, current | ended, acks, notes))
        for job_id, what in notes:
            agent_scope.dropped(self.agent_id, "lines", what, job_id)
        for u in msg.updates:
            if u.job_id in current:
                kept.updates.append(u)
            else:
                agent_scope.dropped(self.agent_id, "update", "a status update", u.job_id)
                acks.update_acks.append(agent_pb2.UpdateAck(job_id=u.job_id, status=u.status))
                if u.status in FINAL:  # a stale attempt's end: its process is gone, its capacity free
                    self.core.engine.stale_attempt_ended(self.agent_id, u.job_id)
        return kept, acks

    def _screen_logs(
        self, batches: Sequence[agent_pb2.LogBatch], acks: agent_pb2.CoordinatorMessage, notes: list[tuple[str, str]]
    ) -> list[agent_pb2.LogBatch]:
        """(DB thread) `_screen` for a message of log batches alone: the batches of the agent's own
        attempts; the others acknowledged into `acks`, and noted in `notes` for the warning."""
        current, ended = agent_scope.reportable_now(self.core.store, self.agent_id, [b.job_id for b in batches])
        return _keep_logs(batches, current | ended, acks, notes)

    async def outgoing(self) -> AsyncIterator[agent_pb2.CoordinatorMessage]:
        assert self._conn is not None, "start the session first"
        while (msg := await self._conn.next_batch()) is not None:
            yield msg

    def end_input(self) -> None:
        """The agent's side of the stream ended, or a message failed: so does our stream."""
        self.ended = True
        if self._conn is not None:
            self._conn.close()

    def close(self) -> None:
        # As the stream's handler task is: a retry of a refused write gives up (the agent sends it again). What
        # follows from reports already committed is the engine's, and goes on (Engine._report).
        for task in self._tasks:
            task.cancel()
        if self._conn is not None:
            self.core.engine.hub.detach(self._conn)
            log.info("agent %s disconnected", self.agent_id)


def _keep_logs(
    batches: Sequence[agent_pb2.LogBatch],
    allowed: set[str],
    acks: agent_pb2.CoordinatorMessage,
    notes: list[tuple[str, str]],
) -> list[agent_pb2.LogBatch]:
    """The batches of `allowed` attempts; each other one is acknowledged in `acks` (so an honest agent
    holding lines of a job it lost stops resending them) and noted as (job, what) for the warning."""
    kept = []
    for b in batches:
        if b.job_id in allowed:
            kept.append(b)
        elif b.lines or b.blocks:
            notes.append((b.job_id, f"{batch_lines(b)} log line(s)"))
            seq = max([batch_last_seq(b), *(ln.seq for ln in b.lines)])
            acks.log_acks.append(agent_pb2.LogAck(job_id=b.job_id, seq=seq))
    return kept
