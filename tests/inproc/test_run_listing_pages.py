"""ListRuns pages with no silent cap: with more than 1,000 active runs, `dstack ps` (the CLI's client,
which follows next_page_token) still lists every active run and the recently finished ones."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from dstack.cli.client import Client
from dstack.cli.home import Endpoint
from dstack.coordinator.store.runs import NewJob
from dstack.protos.v1 import client_pb2
from tests.inproc.factories import ADMIN, Harness, coordinator, job_spec, submit_run

ACTIVE = 1_050
T = TypeVar("T")


async def test_listings_page_past_a_thousand_active_runs(tmp_path: Path) -> None:
    async with coordinator(tmp_path, max_queued_per_user=0, max_submissions_per_minute=0) as h:
        finished = await submit_run(h)
        await h.client.StopRun(client_pb2.StopRunRequest(name=finished.name), metadata=h.meta)
        engine = h.coordinator.engine
        spec = job_spec().SerializeToString()

        def insert_active() -> list[str]:  # cheaply, straight into the store: they only need to be listed
            job = NewJob(job_name="main", spec=spec, cpu=1.0, memory=0, gpu_count=0, depends_on=[])
            return [engine.store.create_run("admin", "w", b"", "", [], [job]).name for _ in range(ACTIVE)]

        active = set(await engine.db(insert_active))

        first: client_pb2.ListRunsResponse = await h.client.ListRuns(client_pb2.ListRunsRequest(), metadata=h.meta)
        assert len(first.runs) == 1000 and first.next_page_token, "the first page is full and says more follow"
        assert finished.name not in {r.name for r in first.runs}

        endpoint = Endpoint(address=h.address, token=ADMIN, insecure=True)

        def ps(include_all: bool) -> list[str]:
            client = Client(endpoint)
            try:
                return [r.name for r in client.list_runs(include_all)]
            finally:
                client.close()

        listed = await asyncio.to_thread(ps, False)
        assert len(listed) == len(set(listed)), "a run listed twice"
        assert set(listed) == active | {finished.name}
        everything = await asyncio.to_thread(ps, True)
        assert sorted(everything) == sorted(active | {finished.name})

        small: client_pb2.ListRunsResponse = await h.client.ListRuns(
            client_pb2.ListRunsRequest(all=True, limit=400), metadata=h.meta
        )
        assert len(small.runs) == 400

        for bad in ("nonsense", "all:x:y", "active:1:x"):  # the last: an `all` token is expected here
            try:
                await h.client.ListRuns(client_pb2.ListRunsRequest(all=True, page_token=bad), metadata=h.meta)
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
                assert "invalid page token" in str(e.details())
            else:
                raise AssertionError(f"page token {bad!r} accepted")


async def three_finished_behind_250_active(h: Harness) -> tuple[list[client_pb2.Run], set[str]]:
    """Three runs stopped (finished), then 250 unfinished ones inserted in one store call (one clock
    instant: in the listing's own order, by id): a queue deeper than `dstack ps`'s page of 100."""
    done = [await submit_run(h) for _ in range(3)]
    for r in done:
        await h.client.StopRun(client_pb2.StopRunRequest(name=r.name), metadata=h.meta)
    engine = h.coordinator.engine
    spec = job_spec().SerializeToString()

    def insert_active() -> list[str]:
        job = NewJob(job_name="main", spec=spec, cpu=1.0, memory=0, gpu_count=0, depends_on=[])
        return [engine.store.create_run("admin", "w", b"", "", [], [job]).name for _ in range(250)]

    return done, set(await engine.db(insert_active))


async def test_ps_shows_the_first_page_and_the_latest_finished_runs_behind_a_deep_queue(tmp_path: Path) -> None:
    """`dstack ps` with a deep queue: two calls give the newest unfinished runs and the latest finished
    ones (which come after every unfinished run in the listing), and say that runs were left out; the
    hundred pages of 100,000 queued runs are fetched only on request (`--limit 0`)."""
    async with coordinator(tmp_path, max_queued_per_user=0, max_submissions_per_minute=0) as h:
        done, active = await three_finished_behind_250_active(h)
        endpoint = Endpoint(address=h.address, token=ADMIN, insecure=True)

        def head(include_all: bool, limit: int) -> tuple[list[str], bool]:
            client = Client(endpoint)
            try:
                runs, more = client.list_runs_head(include_all, limit)
                return [r.name for r in runs], more
            finally:
                client.close()

        names, more = await asyncio.to_thread(head, False, 100)
        assert more
        assert len(set(names[:100])) == 100 and set(names[:100]) <= active  # a page of unfinished runs
        assert sorted(names[100:]) == sorted(r.name for r in done)  # and every finished one (fewer than 10)
        names, more = await asyncio.to_thread(head, False, 2000)
        assert not more and sorted(names) == sorted(active | {r.name for r in done})
        names, more = await asyncio.to_thread(head, True, 50)
        assert more and len(names) == 50


class CountingClient(Client):
    """The CLI's client, counting its ListRuns calls; `old`: as an older coordinator answers them (it does
    not know ListRunsRequest.with_finished, so the field is dropped before the call)."""

    def __init__(self, endpoint: Endpoint, old: bool = False) -> None:
        super().__init__(endpoint)
        self.requests: list[client_pb2.ListRunsRequest] = []
        self.old = old

    def _call(self, fn: Callable[..., T], request: Any, **kw: Any) -> T:
        if isinstance(request, client_pb2.ListRunsRequest):
            self.requests.append(request)
            if self.old:
                request = client_pb2.ListRunsRequest()
                request.CopyFrom(self.requests[-1])
                request.ClearField("with_finished")
        return super()._call(fn, request, **kw)


async def test_ps_behind_a_deep_queue_is_one_call_that_brings_the_latest_finished_runs(tmp_path: Path) -> None:
    """`dstack ps` behind a deep queue makes one ListRuns call, not two: the page asks for the latest
    finished runs (with_finished), which the coordinator reads with the page, in its snapshot. What is
    shown is the same as with an older coordinator (which ignores the field: then a second call)."""
    async with coordinator(tmp_path, max_queued_per_user=0, max_submissions_per_minute=0) as h:
        done, active = await three_finished_behind_250_active(h)
        done_names = sorted(r.name for r in done)
        endpoint = Endpoint(address=h.address, token=ADMIN, insecure=True)

        def head(include_all: bool, limit: int, old: bool = False) -> tuple[list[str], bool, int]:
            client = CountingClient(endpoint, old)
            try:
                runs, more = client.list_runs_head(include_all, limit)
                return [r.name for r in runs], more, len(client.requests)
            finally:
                client.close()

        for old in (False, True):
            names, more, calls = await asyncio.to_thread(head, False, 100, old)
            assert calls == (2 if old else 1), (old, calls)
            assert more and len(set(names[:100])) == 100 and set(names[:100]) <= active
            assert sorted(names[100:]) == done_names
            names, more, calls = await asyncio.to_thread(head, False, 2000, old)  # the page reaches them
            assert calls == 1 and not more and sorted(names) == sorted(active | set(done_names))
            names, more, calls = await asyncio.to_thread(head, True, 50, old)
            assert calls == 1 and more and len(names) == 50

        # The coordinator's side: finished runs only where the page stopped before them, never with `all`.
        page: client_pb2.ListRunsResponse = await h.client.ListRuns(
            client_pb2.ListRunsRequest(limit=100, with_finished=True), metadata=h.meta
        )
        assert page.finished_sent and page.next_page_token.startswith("active:")
        assert len(page.runs) == 100 and sorted(r.name for r in page.finished) == done_names
        whole: client_pb2.ListRunsResponse = await h.client.ListRuns(
            client_pb2.ListRunsRequest(limit=1000, with_finished=True), metadata=h.meta
        )
        assert whole.finished_sent and not whole.finished and not whole.next_page_token
        assert sorted(r.name for r in whole.runs) == sorted(active | set(done_names))
        every: client_pb2.ListRunsResponse = await h.client.ListRuns(
            client_pb2.ListRunsRequest(all=True, limit=10, with_finished=True), metadata=h.meta
        )
        assert not every.finished_sent and not every.finished and len(every.runs) == 10
        plain: client_pb2.ListRunsResponse = await h.client.ListRuns(
            client_pb2.ListRunsRequest(limit=100), metadata=h.meta
        )
        assert not plain.finished_sent and not plain.finished  # as before, for an older CLI
