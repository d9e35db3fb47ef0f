"""The lease loop outlives a failure in any of its sweeps.

Each lease check, once the leases that ran out are recorded, settles gangs, reads back owed requeues, stops
jobs past their max_duration and applies the preemption policy (coordinator/engine.py `Engine._lease_loop`).
Before, the preemption's write (`Store.request_preempt`) was outside any guard: one failure of it (a busy or
full database) ended the loop for good, and with it every later lease check: no agent was ever marked lost
again, nor any job preempted or stopped for its max_duration, until a restart.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.inproc.factories import coordinator, sim_agent
from tests.inproc.test_fairshare import NO_LEASES, Pool, add_users, ids
from tests.inproc.test_preemption import stops, submit

pytestmark = pytest.mark.inproc


async def test_a_failed_preemption_write_does_not_end_the_lease_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "dstack.coordinator")
    async with (
        coordinator(tmp_path, lease_timeout_s=NO_LEASES, preempt_after_s=60, preempt_min_run_s=60) as h,
        sim_agent(h, "gpu-1", gpus=4) as agent,
    ):
        await add_users(h)
        pool = Pool(h, agent)
        a_runs = [await submit(h, "alice", interruptible=True) for _ in range(4)]
        await pool.settle()
        assert len(pool.running(ids(a_runs))) == 4
        await pool.advance(30)
        await submit(h, "bob")
        await pool.settle()
        store = h.coordinator.engine.store
        plain, failed = store.request_preempt, list[Sequence[str]]()

        def busy_once(job_ids: Sequence[str], message: str) -> Any:
            if not failed:
                failed.append(job_ids)
                raise sqlite3.OperationalError("database is locked")
            return plain(job_ids, message)

        store.request_preempt = busy_once
        await pool.advance(61)  # bob waited past --preempt-after: the check's write fails once
        assert failed and stops(agent) == []
        await pool.advance(1)  # the next check preempts
        await agent.until(lambda: stops(agent), "a preemption for bob")
        assert len(stops(agent)) == 1
        assert "lease check: preempt by policy failed" in caplog.text
