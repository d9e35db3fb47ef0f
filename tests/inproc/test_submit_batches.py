"""SubmitRuns under a database fault: the batch is one transaction, so a failure while storing one of its
runs leaves none of them stored (and none queued), and the call says so; sent again, each run is
submitted once. Refusals of single runs (a limit) still stand alone.

The fault is a real SQLite error, raised by a trigger on the coordinator's own database (as a full disk
or an I/O error would fail the insert): no code of the coordinator is replaced."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from dstack.protos.v1 import client_pb2
from tests.inproc.factories import Harness, coordinator, job_spec

pytestmark = pytest.mark.inproc

FAULT = (
    "CREATE TRIGGER inject_fault BEFORE INSERT ON runs WHEN NEW.args LIKE '%boom%'"
    " BEGIN SELECT RAISE(ABORT, 'injected fault: disk I/O error'); END"
)


def batch(*args: str) -> client_pb2.SubmitRunsRequest:
    return client_pb2.SubmitRunsRequest(
        runs=[client_pb2.SubmitRunRequest(workflow="w", jobs=[job_spec()], args=[a]) for a in args]
    )


async def listed(h: Harness) -> list[client_pb2.Run]:
    resp = await h.client.ListRuns(client_pb2.ListRunsRequest(all=True), metadata=h.meta)
    return list(resp.runs)


async def execute(h: Harness, sql: str) -> None:
    store = h.coordinator.engine.store
    await h.coordinator.engine.db(store.conn.execute, sql)


async def test_a_fault_in_the_middle_of_a_batch_stores_none_of_it(tmp_path: Path) -> None:
    async with coordinator(tmp_path, max_queued_per_user=0, max_submissions_per_minute=0) as h:
        await execute(h, FAULT)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await h.client.SubmitRuns(batch("a", "b", "boom", "c"), metadata=h.meta)
        assert e.value.code() == grpc.StatusCode.ABORTED, e.value
        assert "while storing run 3 of the 4 in this call" in (e.value.details() or "")
        assert "injected fault: disk I/O error" in (e.value.details() or "")
        assert "none of the 4 runs was stored" in (e.value.details() or "")
        # Runs 1 and 2 were inserted before the fault: undone with it, and never queued.
        assert await listed(h) == []
        assert len(h.coordinator.engine.queue) == 0
        # The same batch again, once the fault is gone: each run once.
        await execute(h, "DROP TRIGGER inject_fault")
        resp = await h.client.SubmitRuns(batch("a", "b", "boom", "c"), metadata=h.meta)
        assert list(resp.errors) == ["", "", "", ""]
        runs = await listed(h)
        assert sorted(r.name for r in runs) == sorted(r.name for r in resp.runs) and len(runs) == 4


async def test_a_refused_run_stands_alone_and_the_rest_are_stored(tmp_path: Path) -> None:
    """A refusal (the queued-jobs limit) is not a fault: it undoes its own run only."""
    async with coordinator(tmp_path, max_queued_per_user=2, max_submissions_per_minute=0) as h:
        resp = await h.client.SubmitRuns(batch("a", "b", "c"), metadata=h.meta)
        assert [bool(e) for e in resp.errors] == [False, False, True]
        assert "the limit is 2 (--max-queued-per-user)" in resp.errors[2]
        assert len(await listed(h)) == 2
