"""Self-fencing (agent/lease.py) while the coordinator's store stalls: a healthy agent whose job keeps
printing must keep its lease. The coordinator reads a heartbeat, and acknowledges it in memory, only once it
has read every message the agent sent before it, and it holds at most 16 of them read but not handled
(coordinator/services/agent.py). Issue 16's chaos runs at 1,000 jobs stopped 6-22 healthy jobs this way:
an agent sent its log lines in one small batch each, the batches filled that inbox while a store write was
slow, the heartbeats behind them went unread for longer than the agent's fence deadline, and the agent
stopped its jobs. The agent now keeps at most a few batches unacknowledged (agent/outbox.py).

Attack: the store's one thread is held for longer than the fence deadline while a job prints a line every
few milliseconds; the job must not be stopped.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dstack.agent.connection import Agent
from dstack.protos.v1 import common_pb2
from tests.inproc.factories import (
    JS,
    GatedProcess,
    GatedRuntime,
    Harness,
    coordinator,
    job_spec,
    real_agent,
    submit_run,
    wait_until,
)

pytestmark = pytest.mark.inproc

LEASE_S = 3.0
MARGIN_S = 5.0
KILL_S = 4.0  # the agent stops its jobs 4 s after its last acknowledged send
BEAT_S = 0.25
STALL_S = 6.0  # longer than that


async def running(h: Harness, run_name: str) -> common_pb2.JobStatus.ValueType | None:
    job = await h.job(run_name)
    return job.status if job.status == JS.JOB_STATUS_RUNNING else None


async def print_while(proc: GatedProcess, agent: Agent, seconds: float) -> tuple[int, float]:
    """The job prints one line at a time (each goes in a batch of its own) for `seconds`. Returns the lines
    printed and the least lease the agent had left meanwhile."""
    closest = float("inf")
    until = time.monotonic() + seconds
    i = 0
    while time.monotonic() < until:
        i += 1
        proc.say(f"line {i}")
        await asyncio.sleep(0.01)
        left = agent.lease.remaining()
        assert left is not None
        closest = min(closest, left)
    return i, closest


async def assert_unstopped_and_every_line_once(
    h: Harness,
    agent: Agent,
    proc: GatedProcess,
    run_name: str,
    caplog: pytest.LogCaptureFixture,
    lines: int,
    closest: float,
) -> None:
    """The agent stopped nothing; once the job ends, every line it printed is stored once, in order."""
    assert "self-fence" not in caplog.text, f"least lease left {closest:.2f}s\n{caplog.text}"
    assert agent.jobs and not any(r.fenced for r in agent.jobs.values()), "the agent stopped its healthy job"
    proc.exit(0)

    async def done() -> bool:
        return (await h.job(run_name)).status == JS.JOB_STATUS_DONE

    await wait_until(done, "the job to finish")
    printed = [text for _, _, text in await h.logs(run_name) if text.startswith("line ")]
    assert printed == [f"line {k}" for k in range(1, lines + 1)]  # every line once, in order


async def test_a_job_printing_while_the_store_stalls_past_the_fence_deadline_is_not_stopped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "dstack.agent")
    runtime = GatedRuntime()
    async with (
        coordinator(
            tmp_path, lease_timeout_s=LEASE_S, heartbeat_interval_s=BEAT_S, fence_margin_s=MARGIN_S, fence_kill_s=KILL_S
        ) as h,
        real_agent(h, runtime=runtime) as agent,
    ):
        run = await submit_run(h, job_spec("main"))
        proc = await runtime.started(run.jobs[0].id)
        await wait_until(lambda: running(h, run.name), "the job to run")

        release, entered = threading.Event(), threading.Event()

        def stalled_write() -> None:  # the store's thread is busy until the test says so
            entered.set()
            release.wait(60)

        blocker = asyncio.ensure_future(h.coordinator.engine.db(stalled_write))
        try:
            await asyncio.to_thread(entered.wait, 10)
            lines, closest = await print_while(proc, agent, STALL_S)
        finally:
            release.set()
            await blocker
        await assert_unstopped_and_every_line_once(h, agent, proc, run.name, caplog, lines, closest)


async def test_a_busy_default_thread_pool_does_not_hold_back_the_heartbeat(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The heartbeat looks at the disk (statvfs) and inventory on a worker thread. On the default pool (6
    threads on 2 cores) it queued behind the agent's other blocking work (artifact uploads, code unpacks,
    cgroups): with the pool busy for longer than the fence deadline no heartbeat went out, and the agent
    stopped its own healthy job. Attack: every default worker is held past that deadline."""
    caplog.set_level(logging.INFO, "dstack.agent")
    runtime = GatedRuntime()
    async with (
        coordinator(
            tmp_path, lease_timeout_s=LEASE_S, heartbeat_interval_s=BEAT_S, fence_margin_s=MARGIN_S, fence_kill_s=KILL_S
        ) as h,
        real_agent(h, runtime=runtime) as agent,
    ):
        run = await submit_run(h, job_spec("main"))
        await runtime.started(run.jobs[0].id)
        await wait_until(lambda: running(h, run.name), "the job to run")

        loop = asyncio.get_running_loop()
        gate = threading.Event()
        busy = [loop.run_in_executor(None, gate.wait, 60) for _ in range(64)]  # more than the pool has
        closest = float("inf")
        try:
            until = time.monotonic() + STALL_S
            while time.monotonic() < until:
                await asyncio.sleep(0.05)
                left = agent.lease.remaining()
                assert left is not None
                closest = min(closest, left)
        finally:
            gate.set()
            await asyncio.gather(*busy)
        assert "self-fence" not in caplog.text, f"least lease left {closest:.2f}s\n{caplog.text}"
        assert agent.jobs and not any(r.fenced for r in agent.jobs.values()), "the agent stopped its healthy job"


async def test_a_job_printing_while_the_coordinators_disk_is_full_past_the_fence_deadline_is_not_stopped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The coordinator's disk full: every store write fails (SQLITE_FULL). A message whose write failed ended
    the agent's stream, and its hello failed too, so no heartbeat was acknowledged and every agent stopped its
    healthy jobs once the disk stayed full past its deadline (bench.chaos coordinator-disk-full: 12 of 12
    running jobs stopped, 2 of them then failed `agent lost`). Now the message waits and is written again,
    and the stream stays (agent_stream.Session.receive_stored). Attack: the store refuses every agent write
    for longer than the fence deadline while a job prints; nothing is stopped and no line is lost."""
    caplog.set_level(logging.INFO, "dstack.agent")
    runtime = GatedRuntime()
    async with (
        coordinator(
            tmp_path, lease_timeout_s=LEASE_S, heartbeat_interval_s=BEAT_S, fence_margin_s=MARGIN_S, fence_kill_s=KILL_S
        ) as h,
        real_agent(h, runtime=runtime) as agent,
    ):
        run = await submit_run(h, job_spec("main"))
        proc = await runtime.started(run.jobs[0].id)
        await wait_until(lambda: running(h, run.name), "the job to run")

        store = h.coordinator.engine.store
        full = threading.Event()
        refused = 0

        def refusing(write: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                nonlocal refused
                if full.is_set():
                    refused += 1
                    e = sqlite3.OperationalError("database or disk is full")
                    e.sqlite_errorname = "SQLITE_FULL"  # as SQLite sets it
                    raise e
                return write(*args, **kwargs)

            return call

        # What an agent's stream writes: its lines, its updates, its inventory, its hello.
        for name in ("insert_logs", "apply_job_updates", "apply_job_updates_many", "heartbeat", "agent_online"):
            setattr(store, name, refusing(getattr(store, name)))
        full.set()
        try:
            lines, closest = await print_while(proc, agent, STALL_S)
        finally:
            full.clear()
        assert refused, "the store never refused a write: the attack did not happen"
        await assert_unstopped_and_every_line_once(h, agent, proc, run.name, caplog, lines, closest)
