"""Leases across a coordinator restart: agents get time to notice it is back before they are lost."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.engine import Engine
from dstack.coordinator.store import Store
from dstack.coordinator.store.executor import DbExecutor

LEASE_S = 3.0
GRACE_S = 30.0


def test_a_start_gives_online_agents_a_lease_plus_the_reconnect_grace(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    online = store.register_agent("a", "tok-a", b"")
    store.agent_online(online, b"", 1)  # its last lease, from before the restart, ran out long ago
    config = CoordinatorConfig(
        state_dir=tmp_path,
        listen="unix:///unused",
        storage_url=str(tmp_path / "storage"),
        admin_token="admin",
        join_token="join",
        lease_timeout_s=LEASE_S,
        reconnect_grace_s=GRACE_S,
    )
    started = time.time_ns()

    async def start_and_stop() -> None:
        db = DbExecutor(store)
        engine = Engine(config, store, db)
        await engine.start()
        await engine.stop()
        db.shutdown()

    asyncio.run(start_and_stop())
    lease = next(r for r in store.list_agents() if r.id == online).lease_expires_at
    assert lease >= started + int((LEASE_S + GRACE_S) * 1e9)
    # When one lease period alone would have run out, the agent has not been declared lost...
    assert store.expire_leases(started + int((LEASE_S + 1) * 1e9)) == []
    # ...and once the grace is over too, it is.
    assert store.expire_leases(lease + 1) == [online]
    store.close()
