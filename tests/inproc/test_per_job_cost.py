"""What the coordinator does per job (issue 16, `bench.e2e`'s coordinator CPU per job): the gRPC server
waits on one pending request, not one per method; a job report that leaves its run's status as it was
writes no run row; an environment part finds its run in the write itself. Each check counts work, never
time, so load does not move it."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dstack.protos.v1 import agent_pb2, client_pb2, common_pb2
from tests.inproc.factories import JS, TR, Harness, coordinator, job_spec, sim_agent, submit_run

pytestmark = pytest.mark.inproc


def _coroutine_names() -> list[str]:
    return [getattr(t.get_coro(), "__qualname__", "") for t in asyncio.all_tasks()]


async def test_the_grpc_server_waits_on_one_pending_request_not_one_per_method(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h:
        info: client_pb2.GetInfoResponse = await h.client.GetInfo(client_pb2.GetInfoRequest(), metadata=h.meta)
        assert info is not None
        run = await submit_run(h)  # a method found by the generic handler, through the auth interceptor
        assert run.name
        # grpc.aio keeps one such task per registered method and waits on all of them for every call it
        # accepts (55 before): our services and health are added as generic handlers only; the one left
        # is the reflection service's single method (coordinator/server.py).
        registered = [n for n in _coroutine_names() if "request_registered_call" in n]
        assert len(registered) <= 1, f"{len(registered)} per-method request tasks"


@contextmanager
def writes_to(conn: sqlite3.Connection) -> Iterator[list[str]]:
    """Every statement the coordinator's writer connection runs meanwhile (on its DB thread)."""
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    try:
        yield seen
    finally:
        conn.set_trace_callback(None)


def writer(h: Harness) -> sqlite3.Connection:
    conn: sqlite3.Connection = h.coordinator.engine.store.conn
    return conn


async def test_a_report_that_leaves_the_run_s_status_writes_no_run_row_and_the_run_still_follows(
    tmp_path: Path,
) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h, "a", cpu=2) as a:
        run = await submit_run(h, job_spec("one", cpu=1), job_spec("two", cpu=1))
        first, second = await a.wait_assignments(2)
        await a.report(first.job_id, JS.JOB_STATUS_RUNNING)
        assert (await h.run(run.name)).status == common_pb2.RUN_STATUS_RUNNING
        with writes_to(writer(h)) as seen:
            await a.report(second.job_id, JS.JOB_STATUS_RUNNING)  # the run was running already
        assert not [s for s in seen if s.lstrip().upper().startswith("UPDATE RUNS")], seen
        assert not [s for s in seen if s.startswith("SELECT status FROM runs")], seen
        # The spec (for max_duration) comes with the job's row: no read of its own.
        assert not [s for s in seen if s.startswith("SELECT spec FROM jobs")], seen
        await a.report(first.job_id, JS.JOB_STATUS_DONE, TR.TERMINATION_REASON_DONE)
        await a.report(second.job_id, JS.JOB_STATUS_DONE, TR.TERMINATION_REASON_DONE)
        done = await h.run(run.name)
        assert [j.status for j in done.jobs] == [JS.JOB_STATUS_DONE, JS.JOB_STATUS_DONE]


async def test_a_job_part_is_written_for_a_known_job_only_in_one_statement(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h:
        run = await submit_run(h)
        records = h.coordinator.engine.store.records
        db = h.coordinator.engine.db
        with writes_to(writer(h)) as seen:
            assert await db(records.put_job_part, run.jobs[0].id, "environment", {"runtime": "null"})
        # (A scheduling pass may share the batch: only this write's statements are looked at.)
        assert len([s for s in seen if s.startswith("INSERT OR REPLACE INTO records")]) == 1, seen
        assert not [s for s in seen if s.startswith("SELECT run_id FROM jobs")], seen
        assert not await db(records.put_job_part, "no-such-job", "environment", {"runtime": "null"})
        run_id = (await db(h.coordinator.engine.store.run_by_name, run.name)).id
        parts = await db(records.of_run, run_id)
        assert parts[(run.jobs[0].id, "environment")] == {"runtime": "null"}
        assert [key for key in parts if key[1] == "environment"] == [(run.jobs[0].id, "environment")]


async def test_a_brief_job_s_running_and_done_with_its_environment_cost_one_db_thread_call(tmp_path: Path) -> None:
    # What a brief job costs the DB thread when its agent reports it (bench.drain's dispatch): its RUNNING and
    # DONE come in one message, with the environment of the final one. Screening whose attempt it is, writing
    # the environment and applying both reports are one call there, its report batch (coordinator/reports.py):
    # before, the screen and the environment were each a call (a trip and a wake-up of two threads) of their own.
    async with coordinator(tmp_path) as h, sim_agent(h, "a", cpu=1) as a:
        run = await submit_run(h)
        (assigned,) = await a.wait_assignments(1)
        engine = h.coordinator.engine
        await engine.settled()
        calls: list[str] = []
        plain = engine.db.submit

        def counted(fn: object, *args: object, **kwargs: object) -> asyncio.Future[object]:
            calls.append(getattr(fn, "__qualname__", repr(fn)))
            return plain(fn, *args, **kwargs)  # type: ignore[arg-type]

        engine.db.submit = counted  # type: ignore[method-assign,assignment]
        try:
            env = common_pb2.JobEnvironment(runtime="null", python_version="3.11")
            done = TR.TERMINATION_REASON_DONE
            await a.send(
                agent_pb2.AgentMessage(
                    updates=[
                        agent_pb2.JobUpdate(job_id=assigned.job_id, status=JS.JOB_STATUS_RUNNING),
                        agent_pb2.JobUpdate(
                            job_id=assigned.job_id, status=JS.JOB_STATUS_DONE, termination_reason=done, environment=env
                        ),
                    ]
                )
            )
            await a.until(lambda: (assigned.job_id, JS.JOB_STATUS_DONE) in a.update_acks(), "the DONE acknowledged")
        finally:
            engine.db.submit = plain  # type: ignore[method-assign]
        # Only the message's own calls: a scheduling pass kicked by the job's end may have come meanwhile.
        assert [c for c in calls if "_timed_" not in c and "pass" not in c.lower()] == ["ReportBatcher._apply_all"], (
            calls
        )
        assert (await h.run(run.name)).jobs[0].status == JS.JOB_STATUS_DONE
        run_id = (await engine.db(engine.store.run_by_name, run.name)).id
        assert (await engine.db(engine.store.records.of_run, run_id))[(assigned.job_id, "environment")][
            "runtime"
        ] == "null"
