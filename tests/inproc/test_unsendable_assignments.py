"""A placed job whose assignment cannot be built or sent fails alone; the scheduler goes on.

A pass writes its placements (the jobs ASSIGNED), then builds each job's message from the stored spec and
code and sends one message per agent (coordinator/engine.py `Engine._send_assignments`). Before, an
exception there (a corrupt spec or code blob in the database, a bug) ended the scheduler task: no job was
ever placed again until a restart, and the pass's jobs stayed ASSIGNED, never sent, holding their agents'
capacity while the agents stayed connected (only a hello sends an agent's ASSIGNED jobs again; and a hello
that met the corrupt job raised too, so that agent could never connect again). Now the job that cannot be
built fails with a clear message, its capacity is free again, the rest of the pass is sent; a failure of
the send as a whole is tried once more, then fails the pass's jobs.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from dstack.coordinator.engine import Engine
from dstack.coordinator.model import JobStatus, RunStatus, TerminationReason
from dstack.coordinator.store.jobs import Assignment
from tests.inproc.factories import Harness, coordinator, job_spec, sim_agent, submit_run, wait_until

pytestmark = pytest.mark.inproc


def corrupt_spec(h: Harness, job_id: str) -> None:
    """Garbage in the job's stored spec, written behind the coordinator's back (a damaged database)."""
    with contextlib.closing(sqlite3.connect(h.config.db_path)) as c, c:
        assert c.execute("UPDATE jobs SET spec = ? WHERE id = ?", [b"\xff\xff\xff\xff", job_id]).rowcount == 1


async def failed_job(h: Harness, run_name: str) -> str:
    """The run's job's message once it is FAILED for an executor error, its run failed too; read from the
    database (GetRun cannot show a job whose stored spec is garbage)."""

    async def check() -> tuple[str] | None:
        with contextlib.closing(sqlite3.connect(h.config.db_path)) as c:
            row = c.execute(
                "SELECT j.status, j.termination_reason, j.message, r.status FROM jobs j JOIN runs r ON r.id = j.run_id"
                " WHERE r.name = ?",
                [run_name],
            ).fetchone()
        if row is None or row[0] != JobStatus.FAILED:
            return None
        assert (row[1], row[3]) == (TerminationReason.EXECUTOR_ERROR, RunStatus.FAILED)
        return (row[2],)

    return (await wait_until(check, f"the job of {run_name} failed"))[0]


class SendFails:
    """The engine's `_send_assignments` raises the next `times` times (a bug, as in a pass's second half)."""

    def __init__(self, engine: Engine, times: int) -> None:
        self.left, self.plain = times, engine._send_assignments
        engine._send_assignments = self._send  # type: ignore[method-assign]

    def _send(self, assignments: Sequence[Assignment]) -> None:
        if self.left > 0:
            self.left -= 1
            raise RuntimeError("boom")
        self.plain(assignments)


async def test_a_job_with_a_corrupt_spec_fails_alone_and_frees_its_place(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h:
        runs = [await submit_run(h, job_spec()) for _ in range(3)]
        corrupt_spec(h, runs[1].jobs[0].id)
        async with sim_agent(h, "only", cpu=3) as agent:  # all three in one pass
            placed = await agent.wait_assignments(2)
            message = await failed_job(h, runs[1].name)
            assert "stored spec could not be read" in message
            assert sorted(a.job_id for a in placed) == sorted(runs[i].jobs[0].id for i in (0, 2))
            # The scheduler goes on, and the failed job's CPU is free: a fourth job fits only there.
            later = await submit_run(h, job_spec())
            (*_, last) = await agent.wait_assignments(3)
            assert last.job_id == later.jobs[0].id
            assert len(agent.assignments()) == 3


async def test_a_pass_whose_send_raised_once_is_sent_again_and_the_scheduler_goes_on(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h, "only", cpu=4) as agent:
        fails = SendFails(h.coordinator.engine, times=1)
        runs = [await submit_run(h, job_spec()) for _ in range(2)]
        sent = await agent.wait_assignments(2)
        assert fails.left == 0
        assert sorted(a.job_id for a in sent) == sorted(r.jobs[0].id for r in runs)
        later = await submit_run(h, job_spec())
        (*_, last) = await agent.wait_assignments(3)
        assert last.job_id == later.jobs[0].id
        metrics = h.coordinator.engine.metrics
        assert metrics.registry.get_sample_value("dstack_scheduling_pass_failures_total") == 1


async def test_a_pass_whose_send_keeps_raising_fails_its_jobs_and_the_scheduler_goes_on(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h, "only", cpu=1) as agent:
        SendFails(h.coordinator.engine, times=2)  # the send and its second try
        first = await submit_run(h, job_spec())
        assert "could not be sent to its agent" in await failed_job(h, first.name)
        # Aborted on its agent, in case it was sent; its CPU (the agent's only one) is free again.
        await agent.until(lambda: any(s.abort for m in agent.received for s in m.stops), "an abort")
        later = await submit_run(h, job_spec())
        (only,) = await agent.wait_assignments(1)
        assert only.job_id == later.jobs[0].id


async def test_a_hello_that_meets_an_assigned_job_with_a_corrupt_spec_connects_and_fails_that_job(
    tmp_path: Path,
) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h, "only", cpu=2) as agent:
        runs = [await submit_run(h, job_spec()) for _ in range(2)]
        await agent.wait_assignments(2)
        await agent.disconnect()
        corrupt_spec(h, runs[0].jobs[0].id)
        # It never got to start them: its hello is answered (before, it raised, and the stream ended), with
        # the healthy one sent again.
        answer = await agent.connect(active=[])
        assert [a.job_id for a in answer.assignments] == [runs[1].jobs[0].id]
        assert "stored spec could not be read" in await failed_job(h, runs[0].name)
        assert not agent.ended

        async def connected() -> bool:
            a = await h.agent("only")
            return a is not None and a.status == "online"

        await wait_until(connected, "the agent online")


async def test_a_job_whose_failure_could_not_be_written_is_failed_by_the_lease_loop(tmp_path: Path) -> None:
    """The store refused the failure once (a busy or full database): the job stays owed, and the next lease
    check writes it, though no pass comes (nothing else waits)."""
    async with coordinator(tmp_path) as h:
        store = h.coordinator.engine.store
        plain, refused = store.fail_undelivered, list[int]()

        def busy_once(jobs: Sequence[tuple[str, int, str, str]]) -> list[str]:
            if not refused:
                refused.append(len(jobs))
                raise sqlite3.OperationalError("database is locked")
            return plain(jobs)

        store.fail_undelivered = busy_once
        run = await submit_run(h, job_spec())
        corrupt_spec(h, run.jobs[0].id)
        async with sim_agent(h, "only", cpu=1):
            await wait_until(lambda: _true(refused), "the refused write")
            await h.clock.advance(1.0)  # a lease check
            assert "stored spec could not be read" in await failed_job(h, run.name)


async def _true(value: object) -> bool:
    return bool(value)
