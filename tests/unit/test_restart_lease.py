"""The lease a coordinator's start owes online agents, kept across restarts (coordinator/restart_lease.py):
no start gives less than any earlier coordinator on the same state published, so an agent refused by the
port while the coordinator was down (agent/lease.py) is never requeued while it may still run its jobs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from dstack.coordinator import restart_lease
from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.engine import Engine
from dstack.coordinator.store import Store
from dstack.coordinator.store.executor import DbExecutor
from tests.inproc.clock import ManualClock


def config(tmp_path: Path, lease: float, grace: float, margin: float = 2.0, fence: str = "on") -> CoordinatorConfig:
    return CoordinatorConfig(
        state_dir=tmp_path,
        listen="unix:///unused",
        storage_url=str(tmp_path / "storage"),
        admin_token="admin",
        join_token="join",
        lease_timeout_s=lease,
        reconnect_grace_s=grace,
        fence_margin_s=margin,
        fence_kill_s=1.0,
        self_fence=fence,
    )


async def step_to(clock: ManualClock, until: float) -> None:
    """Moves the clock in lease-check steps, so the lease loop checks at each; each step first lets the
    loop run (a step with nobody asleep on the clock would not yield)."""
    while (left := until - clock.monotonic()) > 0:
        await asyncio.sleep(0)
        await clock.advance(min(0.25, left))


def test_the_kept_lease_only_grows_and_is_written_only_when_it_does(tmp_path: Path) -> None:
    assert restart_lease.kept(tmp_path) == 0.0
    assert restart_lease.honour(tmp_path, 40.0) == 40.0
    assert json.loads((tmp_path / restart_lease.FILE).read_text()) == {"seconds": 40.0}
    blocker = (tmp_path / restart_lease.FILE).with_suffix(".tmp")
    blocker.mkdir()  # any write now fails: a start that owes no more than is kept writes nothing (a full disk)
    assert restart_lease.honour(tmp_path, 10.0) == 40.0
    with pytest.raises(OSError):
        restart_lease.honour(tmp_path, 50.0)
    blocker.rmdir()
    assert restart_lease.honour(tmp_path, 50.0) == 50.0
    assert restart_lease.kept(tmp_path) == 50.0
    assert not list(tmp_path.glob("*.tmp"))


def test_a_start_that_cannot_keep_its_lease_starts_and_promises_only_what_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A full or read-only state folder: the coordinator still starts and gives its own restart lease, but
    its hello acks publish only the grace that the lease kept there (by an earlier start) covers."""
    restart_lease.honour(tmp_path, 20.0)  # an earlier start: lease 5 + margin 2 + grace 13
    (tmp_path / restart_lease.FILE).with_suffix(".tmp").mkdir()

    async def check() -> None:
        store = Store(tmp_path / "db.sqlite")
        db = DbExecutor(store)
        engine = Engine(config(tmp_path, 5.0, 30.0), store, db, ManualClock())
        try:
            assert await engine.keep_restart_lease() == 37.0
            assert engine.published_grace_ms() == 13_000
        finally:
            db.shutdown()
            store.close()

    asyncio.run(check())
    assert "cannot write" in caplog.text


def test_an_unreadable_file_falls_back_to_the_coordinators_own_options(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / restart_lease.FILE).write_text("{not json")
    assert restart_lease.honour(tmp_path, 12.0) == 12.0
    assert "unreadable" in caplog.text
    assert restart_lease.kept(tmp_path) == 12.0


@pytest.mark.parametrize(("fence", "grace_ms"), [("on", 30_000), ("strict", 0), ("off", 0)])
def test_the_hello_ack_publishes_the_grace_only_once_kept_and_only_where_refusals_count(
    tmp_path: Path, fence: str, grace_ms: int
) -> None:
    async def check() -> None:
        store = Store(tmp_path / "db.sqlite")
        db = DbExecutor(store)
        engine = Engine(config(tmp_path, 5.0, 30.0, fence=fence), store, db, ManualClock())
        try:
            assert engine.published_grace_ms() == 0  # not kept yet: nothing promised
            await engine.keep_restart_lease()
            assert engine.published_grace_ms() == grace_ms
        finally:
            db.shutdown()
            store.close()

    asyncio.run(check())


def test_a_restart_with_smaller_options_still_gives_what_its_predecessor_published(tmp_path: Path) -> None:
    """The attack: an agent refused while the coordinator was down counts on the first coordinator's
    promise (lease 5 + margin 2 + grace 30: until t + 36 s, the kill time before that); the coordinator comes
    back with --lease-timeout 1 --reconnect-grace 0 (own restart lease 3 s) and the agent never returns.
    Its job must not be requeued while the agent may still run it (until t + 37 s): the second start, at
    t + 2, gives the first one's 37 s, so it is requeued at t + 39 s, not at t + 5 s."""

    async def scenario() -> None:
        clock = ManualClock()
        store = Store(tmp_path / "db.sqlite", clock=clock.time_ns)
        agent_id = store.register_agent("a", "tok-a", b"")
        store.agent_online(agent_id, b"", 1)
        db = DbExecutor(store)

        async def status() -> str:
            return next(r.status for r in await db(store.list_agents) if r.id == agent_id)

        first = Engine(config(tmp_path, 5.0, 30.0), store, db, clock)
        await first.start()
        published = first.published_grace_ms() / 1000
        after_s = first.fence_policy()[0] / 1000
        await first.stop()
        refused_at = clock.monotonic()  # the agent's probe: nobody listens
        agent_deadline = refused_at + after_s + published
        await clock.advance(2.0)  # down for 2 s
        second = Engine(config(tmp_path, 1.0, 0.0), store, db, clock)
        await second.start()
        try:
            assert second.own_restart_lease_s() == 3.0
            # The agent stops its job at its deadline; up to the kill time (1 s) later it is still its job.
            await step_to(clock, agent_deadline + 1.0 - 0.01)
            assert await status() == "online"
            await step_to(clock, agent_deadline + 3.5)  # past the start (t + 2) + 37 s and a check: lost now
            assert await status() == "lost"
            assert second.restart_lease_s == 37.0
        finally:
            await second.stop()
            db.shutdown()
            store.close()

    asyncio.run(scenario())
