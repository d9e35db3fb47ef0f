"""Agents' job reports applied in batches: the messages that reach the coordinator in one turn of its
event loop, from any number of agents, go to the store as one call (store/jobs.py `apply_updates_many`).

One batch is with the store at a time: messages that come while it is applied (or waits behind a
scheduling pass on the DB thread) go in the next one, so batches grow with the load, as a group commit's.
Each agent's stream hands its messages to the engine one at a time, in order (services/agent.py), so an
agent's reports keep their order; several agents' messages share one call, and what is per message but
need not be (a trip to the DB thread, a savepoint, the runs' status refresh, the fair-share charge) is
paid once for the batch (a savepoint per message only when one fails: store/jobs.py `apply_updates_many`).
Each message keeps its own result: its acknowledgements, or its own error (its agent gets no
acknowledgement and sends it again), while the others in the batch are applied.

Fencing is unchanged: a stale session's message never gets here (app/agent_stream.py checks the epoch
first), and the store applies a report only to the reporting agent's current attempt of its job.

Least privilege (coordinator/app/agent_scope.py) is checked here too, in the batch's own store call: the
reports of attempts that are not the agent's acting ones (another agent's job, an attempt that is over)
are dropped before any is applied, in one statement for the whole batch (store/scope.py
`acting_of_many`), not in a DB-thread trip of each message's own before it joins the batch. They are
acknowledged all the same and handed back as `UpdateResult.foreign` (the stream warns, and a stale
attempt's end frees its capacity). So are the run records' environments reported with the updates:
each is written, undone with its message's reports, only for the agent's acting attempts.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from dstack.coordinator.attempts import parse_wire_job_id
from dstack.coordinator.model import JobUpdate, UpdateAck
from dstack.coordinator.store import Store
from dstack.coordinator.store.executor import DbExecutor
from dstack.coordinator.store.jobs import UpdateResult

log = logging.getLogger("dstack.coordinator")

# (wire job id, the environment part of its run record), as app/agent_stream.py converted it
Environments = Sequence[tuple[str, dict[str, Any]]]
# What a message's reports came to once their batch was applied: its result, its own error (or the batch's),
# or None when the batch's call was cancelled (the coordinator stops).
Outcome = UpdateResult | BaseException | None
_Report = tuple[str, Sequence[JobUpdate], Environments]
_Pending = tuple[str, Sequence[JobUpdate], Environments, Callable[[Outcome], None]]


class ReportBatcher:
    def __init__(self, store: Store, db: DbExecutor) -> None:
        self.store, self.db = store, db
        self._pending: list[_Pending] = []
        self._sending = False  # a batch is with the store, or about to leave (at the end of this turn)
        self.batches = 0  # calls made, and messages they carried (for tests and benches)
        self.messages = 0

    def apply(
        self, agent_id: str, updates: Sequence[JobUpdate], environments: Environments = ()
    ) -> asyncio.Future[UpdateResult]:
        """The store's answer to one agent's message of reports, once the batch it joins is applied: the
        reports of the agent's acting attempts applied, the others dropped (`UpdateResult.foreign`)."""
        fut: asyncio.Future[UpdateResult] = asyncio.get_running_loop().create_future()
        self.apply_then(agent_id, updates, environments, lambda outcome: _settle(fut, outcome))
        return fut

    def apply_then(
        self, agent_id: str, updates: Sequence[JobUpdate], environments: Environments, then: Callable[[Outcome], None]
    ) -> None:
        """`apply`, answered by a call of `then` on the event loop as the batch's results are handed back, in
        the order the messages joined it (no future, no task to wake: app/agent_stream.py's direct path)."""
        self._pending.append((agent_id, updates, environments, then))
        if not self._sending:  # the batch leaves once this turn's callbacks ran (they may add to it)
            self._sending = True
            asyncio.get_running_loop().call_soon(self._send)

    @property
    def waiting(self) -> int:
        """Messages waiting for the next batch (for tests)."""
        return len(self._pending)

    def _send(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            self._sending = False
            return
        self.batches += 1
        self.messages += len(pending)
        call = self.db.submit(self._apply_all, [(agent_id, updates, envs) for agent_id, updates, envs, _ in pending])
        call.add_done_callback(lambda done: self._applied(done, pending))

    def _applied(self, call: asyncio.Future[list[UpdateResult | Exception]], pending: list[_Pending]) -> None:
        _hand_back(call, pending)
        self._send()  # what came meanwhile, as the next batch

    def _apply_all(self, reports: Sequence[_Report]) -> list[UpdateResult | Exception]:
        """On the DB thread: each message screened (its agent's acting attempts), then applied. A message's
        own database error is counted as a call's would be (/metrics)."""
        acting = self.store.agents_acting_of_many([(agent_id, [u.job_id for u in ups]) for agent_id, ups, _ in reports])
        kept: list[tuple[str, Sequence[JobUpdate]]] = []
        foreign: list[list[UpdateAck]] = []
        for (agent_id, updates, _), current in zip(reports, acting, strict=True):
            kept.append((agent_id, [u for u in updates if u.job_id in current]))
            foreign.append([UpdateAck(u.job_id, u.status) for u in updates if u.job_id not in current])

        def environments(k: int) -> None:  # undone with the k-th message's reports, written before them
            for wire_id, part in reports[k][2]:
                if wire_id in acting[k]:
                    # Stored under the job's id: an attempt after the first is sent as `<job id>-aN`
                    # (coordinator/attempts.py), which names no row; the acting attempt's part replaces
                    # the one before it.
                    self.store.records.put_job_part(parse_wire_job_id(wire_id)[0], "environment", part)

        out = self.store.apply_job_updates_many(kept, environments)
        for res, dropped in zip(out, foreign, strict=True):
            if isinstance(res, UpdateResult) and dropped:
                res.acks += dropped  # acknowledged all the same: an honest agent stops resending them
                res.foreign = dropped
        self.db.sqlite_errors += sum(isinstance(r, sqlite3.Error) for r in out)
        return out


def _hand_back(call: asyncio.Future[list[UpdateResult | Exception]], pending: list[_Pending]) -> None:
    error = None if call.cancelled() else call.exception()
    results = call.result() if error is None and not call.cancelled() else None
    for k, (agent_id, _, _, then) in enumerate(pending):
        outcome: Outcome = None if call.cancelled() else error if results is None else results[k]
        try:
            then(outcome)
        except Exception:  # one stream's answer that failed must not keep the others' from theirs
            log.exception("agent %s: handing back its reports' result failed", agent_id)


def _settle(fut: asyncio.Future[UpdateResult], outcome: Outcome) -> None:
    if fut.done():  # its stream ended meanwhile (cancelled)
        return
    if outcome is None:
        fut.cancel()
    elif isinstance(outcome, BaseException):  # its own error, or the batch's (its commit): no ack
        fut.set_exception(outcome)
    else:
        fut.set_result(outcome)
