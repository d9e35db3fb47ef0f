"""ListRuns pages with no silent cap: with more than 1,000 active runs, `dstack ps` (the CLI's client,
which follows next_page_token) still lists every active run and the recently finished ones."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from dstack.cli.client import Client
from dstack.cli.home import Endpoint
from dstack.coordinator.store.runs import NewJob
from dstack.protos.v1 import client_pb2
from tests.inproc.factories import ADMIN, coordinator, job_spec, submit_run

ACTIVE = 1_050


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


async def test_ps_shows_the_first_page_and_the_latest_finished_runs_behind_a_deep_queue(tmp_path: Path) -> None:
    """`dstack ps` with a deep queue: two calls give the newest unfinished runs and the latest finished
    ones (which come after every unfinished run in the listing), and say that runs were left out; the
    hundred pages of 100,000 queued runs are fetched only on request (`--limit 0`)."""
    async with coordinator(tmp_path, max_queued_per_user=0, max_submissions_per_minute=0) as h:
        done = [await submit_run(h) for _ in range(3)]
        for r in done:
            await h.client.StopRun(client_pb2.StopRunRequest(name=r.name), metadata=h.meta)
        engine = h.coordinator.engine
        spec = job_spec().SerializeToString()

        def insert_active() -> list[str]:
            job = NewJob(job_name="main", spec=spec, cpu=1.0, memory=0, gpu_count=0, depends_on=[])
            return [engine.store.create_run("admin", "w", b"", "", [], [job]).name for _ in range(250)]

        active = set(await engine.db(insert_active))  # one clock instant: in the listing's own order (by id)
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
