"""GetRun (what every waiting client asks, once per run and poll): its statements, its thread, its answer."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from dstack.coordinator.model import RunView
from dstack.coordinator.services import client as client_service
from dstack.protos.v1 import client_pb2
from tests.inproc.factories import JS, coordinator, job_ids, job_spec, sim_agent, submit_run, wait_until

pytestmark = pytest.mark.inproc


async def test_get_run_reads_two_statements_and_builds_its_answer_on_a_reader_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One snapshot, two statements (the run with its tags, then its jobs), the proto made off the event loop:
    on the tree before, three statements and the proto built on the loop."""
    async with coordinator(tmp_path) as h:
        run = await submit_run(h, job_spec("a"), job_spec("b"))
        await h.run(run.name)  # the token is looked up (and cached) once, on a reader too
        reads = h.coordinator._reads
        assert reads is not None
        statements: list[str] = []
        for store in reads._stores:
            store.conn.set_trace_callback(statements.append)
        built_on: list[str] = []
        plain = client_service._run_response

        def recorded(view: RunView) -> client_pb2.GetRunResponse:
            built_on.append(threading.current_thread().name)
            return plain(view)

        monkeypatch.setattr(client_service, "_run_response", recorded)
        try:
            got = await h.run(run.name)
        finally:
            for store in reads._stores:
                store.conn.set_trace_callback(None)
        assert [j.job_name for j in got.jobs] == ["a", "b"]
        selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
        assert len(selects) == 2, statements
        assert built_on and all(name.startswith("db-read-") for name in built_on), built_on


async def test_get_run_answers_as_the_listing_does_tags_attempts_and_exit_codes(tmp_path: Path) -> None:
    """The run read by GetRun's own path (run and tags in one statement, rows without enum calls) is the run
    ListRuns gives (run, tags and jobs read apart): the same message, field for field."""
    async with coordinator(tmp_path) as h, sim_agent(h, "a") as agent:
        run = await submit_run(h, job_spec("main"))
        (job_id,) = job_ids(run).values()
        await agent.wait_assignments(1)
        await agent.report(job_id, JS.JOB_STATUS_RUNNING)
        await agent.report(job_id, JS.JOB_STATUS_DONE)
        await h.wait_job(run.name, "main", [JS.JOB_STATUS_DONE])
        for tag in ("second-tag", "first-tag"):
            await h.client.AddTag(client_pb2.AddTagRequest(tag=tag, run_name=run.name), metadata=h.meta)
        waiting = await submit_run(h, job_spec("queued", cpu=64))  # never fits: a waiting job with a reason

        async def said_why() -> client_pb2.Job | None:
            job = await h.job(waiting.name, "queued")
            return job if job.message else None

        await wait_until(said_why, "the waiting job's reason")
        got = {r.name: await h.run(r.name) for r in (run, waiting)}
        listed = await h.client.ListRuns(client_pb2.ListRunsRequest(all=True), metadata=h.meta)
        assert {r.name: r for r in listed.runs} == got
        assert sorted(got[run.name].tags) == ["first-tag", "second-tag"]
        assert got[run.name].jobs[0].status == JS.JOB_STATUS_DONE


async def test_get_run_of_an_unknown_run_is_not_found(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await h.run("no-such-run-1")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "run 'no-such-run-1' does not exist" in (e.value.details() or "")
