"""Per-user submission limits (coordinator/app/limits.py), run as a user flooding the queue would:
through ClientService.SubmitRun, on a manual clock (the rate limit refills as the test moves time)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from dstack.protos.v1 import client_pb2
from tests.inproc.factories import Harness, coordinator, job_spec, submit_run

pytestmark = pytest.mark.inproc


async def add_user(h: Harness, name: str) -> list[tuple[str, str]]:
    """A second user of the pool (there is no RPC for it yet): the metadata of their calls."""
    token = f"tok-{name}"
    await h.coordinator.engine.db(h.coordinator.engine.store.ensure_user, name, token, "user")
    return [("authorization", f"Bearer {token}")]


async def refused(h: Harness, meta: list[tuple[str, str]], jobs: int = 1) -> grpc.aio.AioRpcError:
    req = client_pb2.SubmitRunRequest(workflow="w", jobs=[job_spec(f"j{i}") for i in range(jobs)])
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await h.client.SubmitRun(req, metadata=meta)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
    return e.value


async def test_queued_jobs_per_user_are_bounded_and_counted_per_user(tmp_path: Path) -> None:
    # No agent: every job stays queued.
    async with coordinator(tmp_path, max_queued_per_user=5, max_submissions_per_minute=0) as h:
        for _ in range(2):
            await submit_run(h, job_spec("a"), job_spec("b"))  # 4 queued jobs
        # A run that would take the user past the limit is refused as a whole, with the numbers.
        e = await refused(h, h.meta, jobs=2)
        assert e.details() == (
            "you have 4 queued job(s) and this run adds 2, the limit is 5 (--max-queued-per-user):"
            " wait for some to start or stop some"
        )
        last = await submit_run(h)  # one more fits: 5
        e = await refused(h, h.meta)
        assert "you have 5 queued job(s), the limit is 5 (--max-queued-per-user)" in e.details()
        # The refused runs were never stored.
        listed = await h.client.ListRuns(client_pb2.ListRunsRequest(all=True), metadata=h.meta)
        assert len(listed.runs) == 3
        # Another user has a queue of their own.
        alice = await add_user(h, "alice")
        req = client_pb2.SubmitRunRequest(workflow="w", jobs=[job_spec()])
        await h.client.SubmitRun(req, metadata=alice)
        # Stopping a queued run frees its places.
        await h.client.StopRun(client_pb2.StopRunRequest(name=last.name), metadata=h.meta)
        await submit_run(h)
        await refused(h, h.meta)


async def test_concurrent_submissions_cannot_slip_past_the_queued_limit(tmp_path: Path) -> None:
    async with coordinator(tmp_path, max_queued_per_user=10, max_submissions_per_minute=0) as h:
        req = client_pb2.SubmitRunRequest(workflow="w", jobs=[job_spec()])
        results = await asyncio.gather(
            *(h.client.SubmitRun(req, metadata=h.meta) for _ in range(30)), return_exceptions=True
        )
        accepted = [r for r in results if isinstance(r, client_pb2.SubmitRunResponse)]
        rejected = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(accepted) == 10 and len(rejected) == 20, results
        assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in rejected)


async def test_submission_rate_is_a_token_bucket_per_user(tmp_path: Path) -> None:
    async with coordinator(tmp_path, max_queued_per_user=0, max_submissions_per_minute=6) as h:
        # A burst of a minute's worth passes at once...
        for _ in range(6):
            await submit_run(h)
        # ...the next is refused, saying when to try again (one token per 10 s at 6 per minute).
        e = await refused(h, h.meta)
        assert e.details() == (
            "you submit runs faster than the limit of 6 per minute, in bursts of up to 6"
            " (--max-submissions-per-minute): try again in 10 s"
        )
        # Another user is not slowed down by the first.
        bob = await add_user(h, "bob")
        req = client_pb2.SubmitRunRequest(workflow="w", jobs=[job_spec()])
        await h.client.SubmitRun(req, metadata=bob)
        # Time refills the bucket at the rate: 10 s buys one submission, not two.
        await h.clock.advance(10)
        await submit_run(h)
        await refused(h, h.meta)
        # A long pause refills it only up to a minute's worth.
        await h.clock.advance(3600)
        for _ in range(6):
            await submit_run(h)
        await refused(h, h.meta)


async def test_no_limits_with_zero(tmp_path: Path) -> None:
    async with coordinator(tmp_path, max_queued_per_user=0, max_submissions_per_minute=0) as h:
        for _ in range(50):
            await submit_run(h)
        listed = await h.client.ListRuns(client_pb2.ListRunsRequest(all=True), metadata=h.meta)
        assert len(listed.runs) == 50
