"""Leases on the coordinator's clock: the test moves time, nothing sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import threading
from pathlib import Path

import grpc
import pytest

from dstack.coordinator.engine import Engine
from dstack.protos.v1 import agent_pb2, common_pb2
from tests.inproc.factories import (
    JS,
    TR,
    Harness,
    SimAgent,
    coordinator,
    job_ids,
    job_spec,
    sim_agent,
    submit_run,
    wait_until,
)

pytestmark = pytest.mark.inproc
LEASE_S = 5.0


async def status_of(h: Harness, name: str) -> str:
    agent = await h.agent(name)
    assert agent is not None, f"agent {name} is not listed"
    return agent.status


async def test_a_silent_agent_is_lost_when_its_lease_runs_out_and_its_running_jobs_fail(tmp_path: Path) -> None:
    async with (
        coordinator(tmp_path, lease_timeout_s=LEASE_S) as h,
        sim_agent(h, "silent", cpu=1) as silent,
        sim_agent(h, "beating", cpu=1) as beating,
    ):
        run = await submit_run(h, job_spec("a"), job_spec("b"))  # one CPU each: one job per agent
        await silent.wait_assignments(1)
        await beating.wait_assignments(1)
        on_silent, on_beating = silent.assignments()[0].job_id, beating.assignments()[0].job_id
        assert {on_silent, on_beating} == set(job_ids(run).values())
        await silent.report(on_silent, JS.JOB_STATUS_RUNNING)
        await beating.report(on_beating, JS.JOB_STATUS_RUNNING)

        # Just short of the lease: the lease check runs (advance returns after its pass) and finds nothing.
        await h.clock.advance(LEASE_S - 0.5)
        assert await status_of(h, "silent") == "online"
        assert await status_of(h, "beating") == "online"
        # One of them renews its lease now (its heartbeat is stamped with the coordinator's clock).
        renewed_at = h.clock.time_ns()
        await beating.heartbeat()

        async def renewed() -> bool:
            agent = await h.agent("beating")
            return agent is not None and agent.last_heartbeat_ns == renewed_at

        await wait_until(renewed, "the heartbeat to be stored")

        await h.clock.advance(1.0)
        assert await status_of(h, "silent") == "lost"
        assert await status_of(h, "beating") == "online"
        by_id = {j.id: j for j in (await h.run(run.name)).jobs}
        failed = by_id[on_silent]
        assert failed.status == JS.JOB_STATUS_FAILED
        assert failed.termination_reason == TR.TERMINATION_REASON_AGENT_LOST
        assert failed.message == "agent lost"
        assert failed.finished_at_ns == h.clock.time_ns()  # failed by the lease pass, at the clock's time
        assert by_id[on_beating].status == JS.JOB_STATUS_RUNNING
        # The lost agent's stream is ended by the coordinator; the other one's goes on.
        await silent.until(lambda: silent.ended, "the end of the lost agent's stream")
        assert not beating.ended

        # Without heartbeats the other lease runs out too.
        await h.clock.advance(LEASE_S)
        assert await status_of(h, "beating") == "lost"


async def test_a_lost_agent_is_forgotten_once_not_heard_from_for_the_configured_time(tmp_path: Path) -> None:
    forget_s = 100.0
    async with coordinator(tmp_path, lease_timeout_s=LEASE_S, forget_lost_agents_after_s=forget_s) as h:
        async with sim_agent(h, "gone") as agent:
            await h.clock.advance(LEASE_S + 1)
            assert await status_of(h, "gone") == "lost"
            await h.clock.advance(forget_s / 2)  # lost, but not for long enough
            assert await status_of(h, "gone") == "lost"
            await h.clock.advance(forget_s)
            assert await h.agent("gone") is None
            # Its token went with it: the agent has to register again.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await agent.connect()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_log_batches_renew_the_lease_of_an_agent_whose_heartbeat_is_held_back(tmp_path: Path) -> None:
    """A job printing heavily fills the stream with log batches; the agent's next heartbeat may come after
    the lease. The batches themselves show it is alive (at most one renewal per heartbeat interval)."""
    async with coordinator(tmp_path, lease_timeout_s=LEASE_S, heartbeat_interval_s=1.0) as h:
        async with sim_agent(h, "chatty", cpu=1) as chatty:
            run = await submit_run(h, job_spec("a"))
            (job_id,) = job_ids(run).values()
            await chatty.wait_assignments(1)
            await chatty.report(job_id, JS.JOB_STATUS_RUNNING)
            seq = 1
            for _ in range(4):  # 4 x (lease - 1.5 s): well past one lease, with log batches only
                await h.clock.advance(LEASE_S - 1.5)
                await chatty.log(job_id, seq, f"line {seq}")
                seq += 1
                assert await status_of(h, "chatty") == "online"
            # Silence: now the lease runs out.
            await h.clock.advance(LEASE_S + 0.5)
            assert await status_of(h, "chatty") == "lost"


async def beat(h: Harness, agent: SimAgent, name: str) -> None:
    """A heartbeat, stored before the test moves time on."""
    at = h.clock.time_ns()
    await agent.heartbeat()

    async def stored() -> bool:
        row = await h.agent(name)
        return row is not None and row.last_heartbeat_ns == at

    await wait_until(stored, f"{name}'s heartbeat to be stored")


@pytest.mark.parametrize("step_s", [60.0, -60.0, 3600.0])
async def test_a_wall_clock_step_leaves_every_healthy_agent_online_and_its_jobs_running(
    tmp_path: Path, step_s: float
) -> None:
    """Leases run on the monotonic clock: a step of the coordinator's wall clock (forward or back) is
    no reason to declare agents lost, while an agent that stops beating is still lost on time."""
    async with (
        coordinator(tmp_path, lease_timeout_s=LEASE_S) as h,
        sim_agent(h, "a", cpu=1) as a,
        sim_agent(h, "b", cpu=1) as b,
    ):
        run = await submit_run(h, job_spec("x"), job_spec("y"))
        await a.wait_assignments(1)
        await b.wait_assignments(1)
        on_a, on_b = a.assignments()[0].job_id, b.assignments()[0].job_id
        await a.report(on_a, JS.JOB_STATUS_RUNNING)
        await b.report(on_b, JS.JOB_STATUS_RUNNING)

        h.clock.step_wall(step_s)
        await h.clock.advance(1.0)  # a lease pass runs after the step
        assert await status_of(h, "a") == "online"
        assert await status_of(h, "b") == "online"
        for _ in range(3):  # and keeps them online while they beat
            await beat(h, a, "a")
            await beat(h, b, "b")
            await h.clock.advance(LEASE_S - 1.0)
            assert await status_of(h, "a") == "online"
            assert await status_of(h, "b") == "online"
        by_id = {j.id: j for j in (await h.run(run.name)).jobs}
        assert by_id[on_a].status == by_id[on_b].status == JS.JOB_STATUS_RUNNING

        # A lease still runs out on time: b stops beating.
        await beat(h, a, "a")
        await h.clock.advance(LEASE_S - 1.0)
        await beat(h, a, "a")
        await h.clock.advance(2.0)
        assert await status_of(h, "a") == "online"
        assert await status_of(h, "b") == "lost"


@pytest.mark.parametrize("beat_while_full", [True, False])
async def test_losses_the_store_could_not_record_lose_no_agent_once_it_writes_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, beat_while_full: bool
) -> None:
    """The coordinator's disk fills up (tests/cluster's coordinator-disk-full scenario): leases are renewed
    in memory (coordinator/leases.py), but neither a loss nor when agents were last heard from can be
    written, nor can an agent's hello. When the disk has room again, the first lease check must not find
    every lease run out: agents get a fresh lease, and one that is really gone is lost a lease later.
    Without `beat_while_full`, the agent's stream had ended on another write and its reconnections failed."""
    async with (
        coordinator(tmp_path, lease_timeout_s=LEASE_S, heartbeat_interval_s=1.0) as h,
        sim_agent(h, "beating") as beating,
        sim_agent(h, "gone"),
    ):
        store = h.coordinator.engine.store

        def full(*args: object, **kwargs: object) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        writes = ("heartbeat", "lose_agents", "record_heard")
        real = {name: getattr(store, name) for name in writes}
        for name in writes:
            monkeypatch.setattr(store, name, full)
        if beat_while_full:
            await beat(h, beating, "beating")  # taken in memory: nothing to write, the stream stays up
            assert not beating.ended
        else:
            await beating.disconnect()
        await h.clock.advance(3 * LEASE_S)  # three leases of a full disk: every lease check fails
        for name in writes:
            monkeypatch.setattr(store, name, real[name])

        await h.clock.advance(1.0)  # the first lease check with room on the disk
        assert await status_of(h, "beating") == "online"
        assert await status_of(h, "gone") == "online"
        if not beat_while_full:
            await beating.connect()  # the agent's reconnection, after its backoff
        for _ in range(3):
            await beat(h, beating, "beating")
            await h.clock.advance(LEASE_S / 2)
        assert await status_of(h, "beating") == "online"
        assert await status_of(h, "gone") == "lost"


async def test_an_agent_that_keeps_beating_is_not_lost_while_the_db_thread_is_blocked_for_longer_than_a_lease(
    tmp_path: Path,
) -> None:
    """A scheduling pass over a deep queue (or any slow write) holds the one DB thread for longer than a
    lease. An agent whose log batch waits for that thread keeps sending heartbeats: they are read and renew
    its lease in memory meanwhile (coordinator/leases.py, services/agent.py), so it is not lost once the
    thread is free; a silent agent still is. Before, the heartbeats queued behind the batch, unread, and
    were stored after the lease check had marked the agent lost (issue 16: 118 agents lost at 5,000)."""
    async with (
        coordinator(tmp_path, lease_timeout_s=LEASE_S, heartbeat_interval_s=1.0) as h,
        sim_agent(h, "beating", cpu=1) as beating,
        sim_agent(h, "silent", cpu=1),
    ):
        run = await submit_run(h, job_spec("a"))
        (job_id,) = job_ids(run).values()
        await beating.wait_assignments(1)
        await beating.report(job_id, JS.JOB_STATUS_RUNNING)
        engine = h.coordinator.engine
        listed = await h.agent("beating")
        assert listed is not None
        beating_id = listed.id

        release = threading.Event()
        entered = threading.Event()

        def slow_pass() -> None:  # the DB thread is busy until the test says so
            entered.set()
            release.wait(60)

        blocker = asyncio.ensure_future(engine.db(slow_pass))
        try:
            await asyncio.to_thread(entered.wait, 10)
            # A log batch first: it waits for the DB thread (its lines are screened and stored there).
            line = common_pb2.LogLine(seq=1, stream=common_pb2.LOG_STREAM_STDOUT, text="held")
            await beating.send(agent_pb2.AgentMessage(logs=[agent_pb2.LogBatch(job_id=job_id, lines=[line])]))
            for _ in range(6):  # 3 leases of clock time, a heartbeat every half lease
                h.clock.step(LEASE_S / 2)
                at = h.clock.time_ns()
                await beating.heartbeat()
                await wait_until(functools.partial(_heard, engine, beating_id, at), "the heartbeat read off the stream")
        finally:
            release.set()
            await blocker
        await h.clock.advance(1.0)  # the lease check, with the DB thread free again
        assert await status_of(h, "beating") == "online"
        assert await status_of(h, "silent") == "lost"
        assert engine.metrics.agents_lost._value.get() == 1  # the silent one only


async def test_an_agent_whose_messages_wait_unread_behind_a_stalled_db_thread_is_not_lost(tmp_path: Path) -> None:
    """The coordinator holds at most 16 of an agent's messages read but not handled; with its DB thread
    stalled, an agent that keeps sending (log batches, updates: an old agent, a simulated one) fills them,
    and the stream is not read any more: its heartbeats wait unread in the transport. The lease check that
    ran meanwhile found the lease run out, and its write (behind the stall) marked the agent lost (a 24 s
    stall in a bench.throughput run lost all 50 simulated agents). Its messages arrived: our backlog is not
    its silence (coordinator/leases.py, `hold`). Attack: the DB thread is held while the agent sends 40
    one-line log batches and then heartbeats, and the lease check runs past its lease before the thread is
    free; a silent agent is still lost."""
    async with (
        coordinator(tmp_path, lease_timeout_s=LEASE_S, heartbeat_interval_s=1.0) as h,
        sim_agent(h, "busy", cpu=1) as busy,
        sim_agent(h, "silent", cpu=1),
    ):
        run = await submit_run(h, job_spec("a"))
        (job_id,) = job_ids(run).values()
        await busy.wait_assignments(1)
        await busy.report(job_id, JS.JOB_STATUS_RUNNING)
        engine = h.coordinator.engine
        db_queue = engine.db._queue  # the DB thread's calls not yet taken

        release, entered = threading.Event(), threading.Event()

        def stalled() -> None:  # the DB thread is busy until the test says so
            entered.set()
            release.wait(60)

        blocker = asyncio.ensure_future(engine.db(stalled))
        check: asyncio.Future[None] | None = None
        try:
            await asyncio.to_thread(entered.wait, 10)
            for seq in range(1, 41):  # each waits for the DB thread: more than the inbox holds
                line = common_pb2.LogLine(seq=seq, stream=common_pb2.LOG_STREAM_STDOUT, text=f"line {seq}")
                await busy.send(agent_pb2.AgentMessage(logs=[agent_pb2.LogBatch(job_id=job_id, lines=[line])]))
            for _ in range(3):  # past its lease (and short of the 10 s flush of last-heard times)
                h.clock.step(LEASE_S / 2)
                await busy.heartbeat()  # unread: behind the log batches
            waiting = db_queue.qsize()  # the first batch's store call
            check = asyncio.ensure_future(h.clock.advance(1.0))  # the lease check, with the DB thread held

            async def loss_queued() -> bool:
                return db_queue.qsize() > waiting

            with contextlib.suppress(AssertionError):  # the fix: no loss to write, nothing queued
                async with asyncio.timeout(1.5):
                    await wait_until(loss_queued, "the lease check's write queued behind the stall")
        finally:
            release.set()
            await blocker
            if check is not None:
                await check
        assert await status_of(h, "busy") == "online"
        assert await status_of(h, "silent") == "lost"
        assert engine.metrics.agents_lost._value.get() == 1  # the silent one only
        await busy.until(lambda: busy.log_acks().get(job_id, 0) >= 40, "every line stored")


async def _heard(engine: Engine, agent_id: str, at: int) -> bool:
    return engine.leases.last_heard(agent_id) == at


async def test_a_silent_agent_s_lease_counts_from_its_last_message_s_read_not_from_when_the_database_took_it(
    tmp_path: Path,
) -> None:
    """A message renews its agent's lease as it is read off the stream: the receipt, from which we count
    (Engine.fence_policy: the agent counts from its send). Before, its handling renewed the lease again
    once the message's turn came behind the database, so an agent that fell silent kept its lease (and its
    jobs their GPUs) for as long again as its last message had waited. Attack: the DB thread is held for
    most of a lease while the agent's last message waits; the agent then says nothing more and is lost one
    lease (plus the requeue margin) after that message was read."""
    async with (
        coordinator(tmp_path, lease_timeout_s=LEASE_S, heartbeat_interval_s=1.0) as h,
        sim_agent(h, "quiet", cpu=1) as quiet,
    ):
        run = await submit_run(h, job_spec("a"))
        (job_id,) = job_ids(run).values()
        await quiet.wait_assignments(1)
        await quiet.report(job_id, JS.JOB_STATUS_RUNNING)
        engine = h.coordinator.engine
        listed = await h.agent("quiet")
        assert listed is not None
        release, entered = threading.Event(), threading.Event()

        def stalled() -> None:  # the DB thread is busy until the test says so
            entered.set()
            release.wait(60)

        blocker = asyncio.ensure_future(engine.db(stalled))
        try:
            await asyncio.to_thread(entered.wait, 10)
            h.clock.step(0.5)  # its last message is read later than its report: `_heard` tells the two apart
            read_at = h.clock.time_ns()
            line = common_pb2.LogLine(seq=1, stream=common_pb2.LOG_STREAM_STDOUT, text="last words")
            await quiet.send(agent_pb2.AgentMessage(logs=[agent_pb2.LogBatch(job_id=job_id, lines=[line])]))
            await wait_until(functools.partial(_heard, engine, listed.id, read_at), "the batch read off the stream")
            h.clock.step(LEASE_S - 1.0)  # it waits for the DB thread meanwhile
        finally:
            release.set()
            await blocker
        await quiet.until(lambda: quiet.log_acks().get(job_id, 0) >= 1, "the batch stored")
        assert await status_of(h, "quiet") == "online"
        # One lease and the margin after the read, short of that after the store took it.
        await h.clock.advance(1.0 + engine.requeue_margin_s() + 0.5)
        assert await status_of(h, "quiet") == "lost"
