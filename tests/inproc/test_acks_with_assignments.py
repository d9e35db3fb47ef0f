"""An agent's ack of a report that freed capacity leaves with the pass's next assignment to it, in one write on
its stream (Engine.ack_with_pass, AgentHub.hold): at a deep queue's drain, one write per job, not two. The ack
is never sent before its commit, never lost for good (a stream that ends while it is held drops it, and the agent
sends its update again), and never waits past the first pass begun after it."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from dstack.coordinator import engine as engine_module
from dstack.protos.v1 import agent_pb2
from tests.inproc.factories import (
    JS,
    TR,
    GatedRuntime,
    SimAgent,
    coordinator,
    job_ids,
    job_spec,
    real_agent,
    sim_agent,
    submit_run,
    wait_until,
)

pytestmark = pytest.mark.inproc


def _ran(job_id: str) -> agent_pb2.AgentMessage:
    """A brief job's RUNNING and DONE in one message, as an agent sends them (the drain's message)."""
    done = agent_pb2.JobUpdate(job_id=job_id, status=JS.JOB_STATUS_DONE, termination_reason=TR.TERMINATION_REASON_DONE)
    return agent_pb2.AgentMessage(updates=[agent_pb2.JobUpdate(job_id=job_id, status=JS.JOB_STATUS_RUNNING), done])


def _summary(m: agent_pb2.CoordinatorMessage) -> str:
    acks = [f"ack {u.job_id[-4:]} {JS.Name(u.status)}" for u in m.update_acks]
    assigned = [f"assign {a.job_id[-4:]}" for a in m.assignments]
    return "; ".join([*acks, *assigned, *(f"stop {x.job_id[-4:]}" for x in m.stops)])


def _acks(m: agent_pb2.CoordinatorMessage) -> list[tuple[str, int]]:
    return [(u.job_id, u.status) for u in m.update_acks]


def _writes(a: SimAgent) -> list[agent_pb2.CoordinatorMessage]:
    """The coordinator's writes on the agent's stream that carry assignments or update acks (not a heartbeat's)."""
    return [m for m in a.received if m.assignments or m.update_acks]


async def test_a_drain_costs_one_write_per_job_on_the_agent_s_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cost pin (counts, not time): a one-CPU agent drains 12 queued one-CPU jobs, answering each assignment with
    its RUNNING and DONE at once. Each DONE's ack rides with the next assignment: 12 assignments and one ack alone
    at the end, 13 writes (24 before: an ack, then an assignment). Every ack follows its job's DONE in the store.
    Passes are not paced here (a long pause before the next pass sends what is held at once: on a loaded machine a
    slow pass would make the count vary)."""
    monkeypatch.setattr(engine_module, "PACE_AFTER_S", 3600.0)
    jobs = 12
    async with coordinator(tmp_path) as h, sim_agent(h, "a", cpu=1) as a:
        runs = [await submit_run(h, job_spec("main", cpu=1)) for _ in range(jobs)]
        ids = {job_ids(r)["main"]: r.name for r in runs}
        for n in range(1, jobs + 1):
            await a.wait_assignments(n)
            job_id = a.assignments()[-1].job_id
            await a.send(_ran(job_id))
        last = a.assignments()[-1].job_id
        await a.until(lambda: (last, JS.JOB_STATUS_DONE) in a.update_acks(), "the last DONE's ack")
        acked = [(u.job_id, u.status) for m in a.received for u in m.update_acks]
        assert sorted(acked) == sorted((j, s) for j in ids for s in (JS.JOB_STATUS_RUNNING, JS.JOB_STATUS_DONE))
        for run in runs:
            assert [j.status for j in (await h.run(run.name)).jobs] == [JS.JOB_STATUS_DONE]
        writes = _writes(a)
        assert len(writes) <= jobs + 1, f"{len(writes)} writes for {jobs} jobs: {[_summary(m) for m in writes]}"
        # Each write after the first carries the previous job's acks with the next job's assignment.
        for before, m in zip(a.assignments(), writes[1:], strict=False):
            assert (before.job_id, JS.JOB_STATUS_DONE) in [(u.job_id, u.status) for u in m.update_acks]


async def test_an_ack_is_sent_alone_once_the_pass_after_it_places_nothing_for_its_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bound: the ack waits for no more than the first pass begun after it. Here that pass has nothing to place
    (the queue is empty once the agent's only job ends): the ack goes alone, at once."""
    monkeypatch.setattr(engine_module, "PACE_AFTER_S", 3600.0)
    async with coordinator(tmp_path) as h, sim_agent(h, "a", cpu=1) as a:
        run = await submit_run(h, job_spec("main", cpu=1))
        job_id = job_ids(run)["main"]
        await a.wait_assignments(1)
        await a.send(_ran(job_id))
        await a.until(lambda: (job_id, JS.JOB_STATUS_DONE) in a.update_acks(), "the DONE's ack")
        assert not h.coordinator.engine.hub._holding or all(c.held is None for c in h.coordinator.engine.hub._holding)


async def test_an_ack_is_not_held_through_a_long_pause_before_the_next_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bound: a pass that took long is followed by a pause as long (pacing, up to PACE_MAX_S); an ack is not held
    through one longer than HOLD_THROUGH_PAUSE_S. Here every pass takes 0.3 s; the DONE commits behind one that
    began before it (a submission asked for it) and places nothing for the agent: the ack goes alone, before the
    pause, not with the next job's assignment after it."""
    monkeypatch.setattr(engine_module, "PACE_AFTER_S", 0.02)
    async with coordinator(tmp_path) as h, sim_agent(h, "a", cpu=1) as a:
        engine = h.coordinator.engine
        first = await submit_run(h, job_spec("main", cpu=1))
        second = await submit_run(h, job_spec("main", cpu=1))
        await a.wait_assignments(1)
        job_id = job_ids(first)["main"]
        plain, in_pass = engine._timed_plan, threading.Event()

        def slow_pass(*args: Any) -> Any:  # (DB thread)
            in_pass.set()
            time.sleep(engine_module.HOLD_THROUGH_PAUSE_S + 0.05)
            return plain(*args)

        monkeypatch.setattr(engine, "_timed_plan", slow_pass)
        await submit_run(h, job_spec("big", cpu=2))  # never placed: a pass begins, and one after each kick
        await asyncio.to_thread(in_pass.wait, 30)
        await a.send(_ran(job_id))  # its batch commits behind that pass
        nxt = job_ids(second)["main"]
        await a.until(lambda: any(x.job_id == nxt for x in a.assignments()), "the next job's assignment")
        kinds = [_summary(m) for m in a.received if m.update_acks or m.assignments]
        done_ack = [i for i, m in enumerate(a.received) if (job_id, JS.JOB_STATUS_DONE) in _acks(m)]
        assigned = [i for i, m in enumerate(a.received) if any(x.job_id == nxt for x in m.assignments)]
        assert done_ack and assigned and done_ack[0] < assigned[0], kinds


async def test_an_ack_held_when_its_stream_ends_is_not_lost_the_update_sent_again_is_acknowledged_once_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: the agent's stream ends while its DONE's ack is held for the next pass (the pass is held on the DB
    thread). The ack is dropped with the stream, never sent on a later one out of turn; the agent sends its DONE
    again on its next stream (as a real agent's outbox does) and gets it acknowledged; the job is DONE once."""
    monkeypatch.setattr(engine_module, "PACE_AFTER_S", 3600.0)
    async with coordinator(tmp_path) as h, sim_agent(h, "a", cpu=1) as a:
        engine = h.coordinator.engine
        first = await submit_run(h, job_spec("main", cpu=1))
        await submit_run(h, job_spec("main", cpu=1))  # the next job: the pass that would carry the ack places it
        await a.wait_assignments(1)
        job_id = a.assignments()[0].job_id
        gate, in_pass = threading.Event(), threading.Event()
        plain = engine._timed_plan

        def held_pass(*args: Any) -> Any:  # (DB thread) the pass that would carry the ack waits for the test
            in_pass.set()
            assert gate.wait(30)
            return plain(*args)

        monkeypatch.setattr(engine, "_timed_plan", held_pass)
        try:
            await a.send(_ran(job_id))

            async def held() -> bool:
                return any(c.held is not None for c in engine.hub._holding)

            await wait_until(held, "the DONE's ack held for the pass")
            assert (job_id, JS.JOB_STATUS_DONE) not in a.update_acks()
            await asyncio.to_thread(in_pass.wait, 30)
            await a.disconnect()
        finally:
            gate.set()
        monkeypatch.setattr(engine, "_timed_plan", plain)
        assert (job_id, JS.JOB_STATUS_DONE) not in a.update_acks(), "acknowledged on the stream that ended"

        async def dropped() -> bool:  # the stream's end dropped what its connection held
            return not any(c.held is not None for c in engine.hub._holding)

        await wait_until(dropped, "the held ack dropped with its stream")
        await a.connect()
        assert not a.update_acks(), "the old stream's ack sent on the new one"
        await a.send(_ran(job_id))  # the agent's outbox sends what was not acknowledged
        await a.until(lambda: (job_id, JS.JOB_STATUS_DONE) in a.update_acks(), "the resent DONE's ack")
        assert [j.status for j in (await h.run(first.name)).jobs] == [JS.JOB_STATUS_DONE]


async def test_the_real_agent_takes_a_job_s_ack_and_the_next_job_s_assignment_in_one_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Order: two jobs that each need all of the only agent's CPUs; the first ends DONE, and its DONE's ack now
    leaves with the second's assignment, in one message, the ack ahead (seen on the coordinator's side, as queued
    for the stream's writer). The real agent (agent/connection.py) must read both: the first job's updates leave
    its outbox (acknowledged, not sent again) and the second starts and ends DONE. Only acks are held: every
    assignment and stop is queued when it was before and in the same order (the agent handles a message's acks,
    then its assignments, then its stops)."""
    monkeypatch.setattr(engine_module, "PACE_AFTER_S", 3600.0)
    sent: list[agent_pb2.CoordinatorMessage] = []
    plain_put = asyncio.Queue.put_nowait

    def put_nowait(queue: asyncio.Queue[Any], item: Any) -> None:  # every message queued for a stream's writer
        if isinstance(item, agent_pb2.CoordinatorMessage):
            copy = agent_pb2.CoordinatorMessage()
            copy.CopyFrom(item)
            sent.append(copy)
        plain_put(queue, item)

    monkeypatch.setattr(asyncio.Queue, "put_nowait", put_nowait)
    runtime = GatedRuntime()
    cpus = float(psutil.cpu_count() or 1)
    async with coordinator(tmp_path) as h, real_agent(h, runtime=runtime) as agent:
        first = await submit_run(h, job_spec("main", cpu=cpus))
        second = await submit_run(h, job_spec("main", cpu=cpus))
        one, two = first.jobs[0].id, second.jobs[0].id
        (await runtime.started(one)).exit(0)
        (await runtime.started(two)).exit(0)

        async def done() -> bool:
            statuses = [[j.status for j in (await h.run(r.name)).jobs] for r in (first, second)]
            return statuses == [[JS.JOB_STATUS_DONE]] * 2

        await wait_until(done, "both jobs DONE")

        async def owed_nothing() -> bool:
            return not agent.outbox.jobs_with_pending()

        await wait_until(owed_nothing, "the agent's outbox emptied by the acks")
        together = [
            m
            for m in sent
            if [a.job_id for a in m.assignments] == [two]
            and (one, JS.JOB_STATUS_DONE) in [(u.job_id, u.status) for u in m.update_acks]
        ]
        assert len(together) == 1, [_summary(m) for m in sent]
        assert len([a for m in sent for a in m.assignments if a.job_id == two]) == 1
