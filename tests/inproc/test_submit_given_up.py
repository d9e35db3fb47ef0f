"""SubmitRun queues a run it stored even when its client gave up waiting for the answer: the run is queued
by the stored call's own callback on the loop (app/runs.py `submit`), not by the handler, which the client's
deadline cancels. And a refusal while storing still reaches a client that waits, with nothing queued."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import pytest

from dstack.protos.v1 import client_pb2
from tests.inproc.factories import coordinator, job_spec

pytestmark = pytest.mark.inproc


def request(arg: str = "") -> client_pb2.SubmitRunRequest:
    return client_pb2.SubmitRunRequest(workflow="w", jobs=[job_spec()], args=[arg] if arg else [])


async def test_a_run_stored_after_its_client_gave_up_is_queued_once(tmp_path: Path) -> None:
    async with coordinator(tmp_path, max_queued_per_user=0, max_submissions_per_minute=0) as h:
        engine = h.coordinator.engine
        held, holding = threading.Event(), threading.Event()

        def hold() -> None:  # the DB thread busy (a long batch) while the submission waits behind it
            holding.set()
            held.wait(30)

        blocker = engine.db.submit(hold)
        await asyncio.to_thread(holding.wait, 30)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await h.client.SubmitRun(request(), metadata=h.meta, timeout=0.5)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(engine.queue) == 0  # not stored yet: the DB thread is held
        held.set()
        await blocker
        for _ in range(500):
            if len(engine.queue):
                break
            await asyncio.sleep(0.01)
        runs = (await h.client.ListRuns(client_pb2.ListRunsRequest(all=True), metadata=h.meta)).runs
        assert len(runs) == 1 and len(engine.queue) == 1
        assert [w.run_id for w in engine.queue.snapshot()] == [engine.store.run_by_name(runs[0].name).id]


async def test_a_store_failure_reaches_the_client_and_queues_nothing(tmp_path: Path) -> None:
    async with coordinator(tmp_path, max_queued_per_user=0, max_submissions_per_minute=0) as h:
        engine = h.coordinator.engine
        await engine.db(
            engine.store.conn.execute,
            "CREATE TRIGGER inject_fault BEFORE INSERT ON runs WHEN NEW.args LIKE '%boom%'"
            " BEGIN SELECT RAISE(ABORT, 'injected fault: disk I/O error'); END",
        )
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await h.client.SubmitRun(request("boom"), metadata=h.meta)
        assert "injected fault" in (e.value.details() or "")
        assert len(engine.queue) == 0
        resp = await h.client.SubmitRun(request("fine"), metadata=h.meta)
        assert resp.run.name and len(engine.queue) == 1
