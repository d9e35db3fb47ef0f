"""Leases across a coordinator restart: agents get time to notice it is back before they are lost.

The engine's lease loop runs on a manual clock: the test moves time past each deadline instead of
waiting for it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.engine import Engine
from dstack.coordinator.store import Store
from dstack.coordinator.store.executor import DbExecutor
from tests.inproc.clock import ManualClock

LEASE_S = 3.0
GRACE_S = 30.0
MARGIN_S = 2.0  # self-fencing's requeue delay past the lease (the agents' own deadline)


def test_a_start_gives_online_agents_a_lease_plus_the_fence_margin_plus_the_reconnect_grace(tmp_path: Path) -> None:
    config = CoordinatorConfig(
        state_dir=tmp_path,
        listen="unix:///unused",
        storage_url=str(tmp_path / "storage"),
        admin_token="admin",
        join_token="join",
        lease_timeout_s=LEASE_S,
        reconnect_grace_s=GRACE_S,
        fence_margin_s=MARGIN_S,
    )

    async def restart_and_watch_the_lease() -> None:
        clock = ManualClock()
        store = Store(tmp_path / "db.sqlite", clock=clock.time_ns)
        online = store.register_agent("a", "tok-a", b"")
        store.agent_online(online, b"", 1)  # its last lease, from before the restart, ran out long ago
        db = DbExecutor(store)
        engine = Engine(config, store, db, clock)

        async def agent() -> tuple[str, int]:
            row = next(r for r in await db(store.list_agents) if r.id == online)
            return row.status, row.lease_expires_at

        await engine.start()
        try:
            # On the monotonic clock: a step of the wall clock must not end leases.
            started = int(clock.monotonic() * 1e9)
            assert await agent() == ("online", started + int((LEASE_S + MARGIN_S + GRACE_S) * 1e9))
            # When one lease period alone would have run out, the lease loop has not declared it lost...
            await clock.advance(LEASE_S + MARGIN_S + 1)
            assert (await agent())[0] == "online"
            # ...and once the grace is over too, it has.
            await clock.advance(GRACE_S)
            assert (await agent())[0] == "lost"
        finally:
            await engine.stop()
            db.shutdown()
            store.close()

    asyncio.run(restart_and_watch_the_lease())


def test_a_stall_of_the_coordinator_itself_is_not_counted_against_the_agents(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The coordinator's event loop does not run for longer than a lease (a long synchronous step, its
    process descheduled on a saturated host): agents' messages wait unread in its sockets, and the first
    lease check after the stall may run before they are read. It renews every lease instead of declaring
    every agent lost; an agent that stays silent is still lost a lease later. Real clock."""
    lease_s = 1.0
    config = CoordinatorConfig(
        state_dir=tmp_path,
        listen="unix:///unused",
        storage_url=str(tmp_path / "storage"),
        admin_token="admin",
        join_token="join",
        lease_timeout_s=lease_s,
        reconnect_grace_s=0.0,
    )

    async def stall_then_watch() -> None:
        store = Store(tmp_path / "db.sqlite")
        agent_id = store.register_agent("a", "tok-a", b"")
        store.agent_online(agent_id, b"", 1)
        db = DbExecutor(store)
        engine = Engine(config, store, db)
        assert engine.guard_stalls

        async def status() -> str:
            return next(r.status for r in await db(store.list_agents) if r.id == agent_id)

        await engine.start()
        try:
            engine.heard(agent_id)
            await asyncio.sleep(0.05)  # the lease loop is waiting for its next check
            time.sleep(3 * lease_s)  # the event loop stalls: nothing is read, no check runs  # noqa: ASYNC251
            await asyncio.sleep(lease_s / 2)  # the check that runs at once after the stall, and the next
            assert await status() == "online"
            # The stall took most of the agents' 4 s count (lease 1 + margin 5 - kill 2): the log says what helps.
            assert "raise --lease-timeout (now 1 s)" in caplog.text
            deadline = time.monotonic() + 30
            while await status() == "online":  # silent from here on: lost once its (extended) lease is over
                assert time.monotonic() < deadline, "a silent agent was never lost"
                await asyncio.sleep(0.1)
            assert await status() == "lost"
        finally:
            await engine.stop()
            db.shutdown()
            store.close()

    asyncio.run(stall_then_watch())
