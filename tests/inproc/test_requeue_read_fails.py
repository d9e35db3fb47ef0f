"""A committed requeue reaches the queue even when reading it back fails.

When a job's row goes back to waiting as a new attempt (its retry policy after a failure, its agent's loss, an
agent's hello without it), the engine reads the waiting jobs back into its in-memory queue
(coordinator/engine.py `Engine._requeued`). Before, a failure of that read (a transient SQLITE_BUSY, IOERR or
FULL) raised: out of a report's follow-up (the message went unacked and its repeat found nothing more to
requeue), out of the lease loop (which ended: no agent was ever marked lost again) or out of a hello. The row
said waiting, the queue never had it, and in a quiet pool nothing placed it until the coordinator restarted.
Now the read is tried again with a doubling pause, then owed to the lease loop's sweep, which reads again at
each check until one works; its failure is logged once.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dstack.coordinator import engine as engine_module
from dstack.coordinator.engine import Engine
from dstack.coordinator.store.cache import CacheHit
from tests.inproc.factories import JS, SimAgent, coordinator, job_spec, sim_agent, submit_run, wait_until
from tests.inproc.test_attempts import LEASE_S, retrying, stored
from tests.inproc.test_report_follow_up import failed

pytestmark = pytest.mark.inproc


class FailingReads:
    """The engine's reads of the waiting jobs (`Store.waiting_jobs`, all of them; `waiting_jobs_of`, by their
    keys) raise SQLite's "database is locked" (its SQLITE_BUSY) the next `times` times. `whole`: how many
    reads of every waiting job were asked for (their cost grows with the queue)."""

    def __init__(self, engine: Engine, times: int) -> None:
        self.left, self.failed, self.whole = times, 0, 0
        for name in ("waiting_jobs", "waiting_jobs_of"):
            if hasattr(engine.store, name):  # the tree before had only the first
                setattr(engine.store, name, self._failing(getattr(engine.store, name), name == "waiting_jobs"))

    def _failing(self, plain: Callable[..., Any], whole: bool) -> Callable[..., Any]:
        def reading(*args: Any) -> Any:
            self.whole += whole
            if self.left > 0:
                self.left -= 1
                self.failed += 1
                raise sqlite3.OperationalError("database is locked")
            return plain(*args)

        return reading


def acked_failed(agent: SimAgent, job_id: str) -> bool:
    return (job_id, JS.JOB_STATUS_FAILED) in agent.update_acks()


def errors_about_requeues(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "back to waiting" in r.message]


@pytest.mark.parametrize("path", ["handler", "direct"])
async def test_a_retried_job_is_placed_in_a_quiet_pool_though_reading_it_back_failed_once(
    tmp_path: Path, path: str
) -> None:
    """The only agent, nothing else happening, the clock still: only the follow-up can queue the job again."""
    async with coordinator(tmp_path) as h, sim_agent(h, "only", cpu=1) as agent:
        await submit_run(h, retrying(["error"]))
        (first,) = await agent.wait_assignments(1)
        await agent.report(first.job_id, JS.JOB_STATUS_RUNNING)
        reads = FailingReads(h.coordinator.engine, times=1)
        await agent.send(failed(first.job_id, path))
        (_, second) = await agent.wait_assignments(2)
        assert second.job_id == f"{first.job_id}-a2"
        assert (reads.failed, reads.whole) == (1, 0)  # read back by its key: no read of the whole queue
        await agent.until(functools.partial(acked_failed, agent, first.job_id), "the FAILED's ack")


async def test_retried_jobs_whose_reads_keep_failing_are_queued_by_the_lease_loop_s_sweep_and_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "dstack.coordinator")
    async with coordinator(tmp_path) as h, sim_agent(h, "only", cpu=3) as agent:  # room for a third job
        engine = h.coordinator.engine
        runs = [await submit_run(h, retrying(["error"])) for _ in range(2)]
        firsts = [a.job_id for a in await agent.wait_assignments(2)]
        for job_id in firsts:
            await agent.report(job_id, JS.JOB_STATUS_RUNNING)
        reads = FailingReads(engine, times=1_000)
        tries = engine_module.REQUEUE_TRIES
        for n, job_id in enumerate(firsts):
            await agent.send(failed(job_id, "direct"))
            await agent.until(functools.partial(acked_failed, agent, job_id), "the FAILED's ack")
            # Every try of the first follow-up failed; the second tried once (reads fail already: no pile of
            # retries), and neither stopped the message's ack (it is committed).
            assert (reads.failed, reads.whole) == (tries + n, 0)  # each by its job's key
        jobs = [await h.job(run.name) for run in runs]
        assert [(j.status, j.attempt) for j in jobs] == [(JS.JOB_STATUS_PENDING, 2)] * 2  # waiting in their rows
        assert not any(j.id in engine.queue for j in jobs)  # not in the queue
        assert len(errors_about_requeues(caplog)) == 1
        stale = [r for r in await engine.db(engine.store.jobs.waiting) if r.id == jobs[0].id]

        await h.clock.advance(1.0)  # a lease check: its sweep's read fails too, and is not logged again
        assert reads.failed == tries + 2
        reads.left = 0
        await h.clock.advance(1.0)  # the next one reads
        assert reads.whole == 2  # the sweep reads every waiting job: it cannot know which are owed
        seconds = [a.job_id for a in (await agent.wait_assignments(4))[2:]]
        assert sorted(seconds) == sorted(f"{j}-a2" for j in firsts)
        assert len(errors_about_requeues(caplog)) == 1
        assert "every requeued job is queued" in caplog.text

        # A stale copy of a waiting row put in the queue again (as a read made before the placement and handed
        # back after it would) is not placed twice: the pass places it, but the placement moves only waiting rows.
        engine.queue.add_row(stale[0])
        engine.kick()
        await engine.settled()
        assert jobs[0].id not in engine.queue  # a pass took it
        await h.clock.advance(1.0)
        assert len(agent.assignments()) == 4
        assert (await h.job(runs[0].name)).status == JS.JOB_STATUS_ASSIGNED


async def test_a_job_requeued_by_its_agent_s_loss_is_placed_though_reading_it_back_failed_and_leases_are_still_checked(
    tmp_path: Path,
) -> None:
    """Before, the failed read raised out of the lease loop, which ended: the job stayed out of the queue, and
    no agent was ever marked lost again."""
    async with coordinator(tmp_path, lease_timeout_s=LEASE_S) as h, sim_agent(h, "a", cpu=1) as a:
        run = await submit_run(h, retrying(["agent-lost"]))
        (first,) = await a.wait_assignments(1)
        await a.report(first.job_id, JS.JOB_STATUS_RUNNING)
        async with sim_agent(h, "b", cpu=1) as b:
            await h.clock.advance(LEASE_S - 0.5)
            await stored(h, b)
            reads = FailingReads(h.coordinator.engine, times=1)
            await h.clock.advance(1.0)  # a's lease ran out, b's did not
            (second,) = await b.wait_assignments(1)
            assert second.job_id == f"{first.job_id}-a2" and (reads.failed, reads.whole) == (1, 0)
            assert (await h.job(run.name)).agent_name == "b"
            await h.clock.advance(LEASE_S + 1)  # b is silent from here: a lease later, it is lost
            await h.wait_agent("b", "lost")


async def test_a_gang_whose_member_failed_and_retries_is_placed_again_whole_though_a_read_back_failed(
    tmp_path: Path,
) -> None:
    """The failed member's requeue (read back by the report's follow-up) and its gang's (by the gang sweep that
    follows it), each by the jobs' keys."""
    async with coordinator(tmp_path) as h, sim_agent(h, "a", cpu=1) as a, sim_agent(h, "b", cpu=1) as b:
        spec = retrying(["error"])
        spec.resources.nodes = 2
        await submit_run(h, spec)
        (on_a,) = await a.wait_assignments(1)
        (on_b,) = await b.wait_assignments(1)
        for agent, job in ((a, on_a), (b, on_b)):
            await agent.report(job.job_id, JS.JOB_STATUS_RUNNING)
        reads = FailingReads(h.coordinator.engine, times=1)
        await a.send(failed(on_a.job_id, "direct"))
        await b.until(lambda: any(s.job_id == on_b.job_id and s.abort for m in b.received for s in m.stops), "abort")

        async def placed_again() -> list[str] | None:
            ids = sorted(x.job_id for agent in (a, b) for x in agent.assignments()[1:])
            return ids if len(ids) == 2 else None

        assert await wait_until(placed_again, "both members placed again") == sorted(
            f"{j.job_id}-a2" for j in (on_a, on_b)
        )
        assert (reads.failed, reads.whole) == (1, 0)


async def test_a_job_its_agent_came_back_without_is_placed_though_reading_it_back_failed(tmp_path: Path) -> None:
    """Before, the failed read raised out of the hello: the stream ended, and the next hello found nothing to
    requeue (the job's row already said waiting)."""
    async with coordinator(tmp_path) as h, sim_agent(h, "only", cpu=1) as agent:
        await submit_run(h, retrying(["agent-lost"]))
        (first,) = await agent.wait_assignments(1)
        await agent.report(first.job_id, JS.JOB_STATUS_RUNNING)
        await agent.disconnect()
        reads = FailingReads(h.coordinator.engine, times=1)
        await agent.connect(active=[])  # it lost the job (a reboot)
        (second,) = await agent.wait_assignments(1)
        assert second.job_id == f"{first.job_id}-a2"
        assert (reads.failed, reads.whole) == (1, 0)


async def test_a_step_cache_hit_that_cannot_be_used_runs_though_forgetting_its_source_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass took the job out of the queue for a cache hit; copying the files failed, and so did forgetting
    the source (the store's disk): the job goes back to the queue all the same, and runs."""
    async with coordinator(tmp_path) as h:
        engine = h.coordinator.engine
        spec = job_spec("main", "train")
        spec.cache = True
        run = await submit_run(h, spec)
        job_id = run.jobs[0].id
        waiting = engine.queue.get(job_id)
        assert waiting is not None
        engine.queue.discard([job_id])  # as the pass that found the hit does

        async def copy_fails(hit: CacheHit) -> None:
            raise OSError("the source's files are gone")

        def forget_fails(source_job_id: str) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        engine.copy_cached = copy_fails
        monkeypatch.setattr(engine.store.cache, "forget", forget_fails)
        hit = CacheHit(job_id, waiting.run_id, run.name, "main", "key", "source", "earlier", "main", ())
        await engine._reuse(hit, waiting)
        assert job_id in engine.queue
        async with sim_agent(h, "only", cpu=1) as agent:
            (assigned,) = await agent.wait_assignments(1)
            assert assigned.job_id == job_id
