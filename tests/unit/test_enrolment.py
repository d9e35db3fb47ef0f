"""Enrolment in the store: join tokens (limits, expiry, revocation, the `default` one, a use taken
with the agent's row), agents removed and approved through the lifecycle table."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dstack.coordinator.errors import AlreadyExists, Conflict, NotFound, Unauthenticated
from dstack.coordinator.model import JobStatus, TerminationReason
from dstack.coordinator.store import NewJob, Placement, Store, hash_token
from dstack.coordinator.store.join_tokens import DEFAULT_ID
from dstack.protos.v1 import common_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Store:
    return Store(tmp_path / "db.sqlite", clock=clock)


def enrol(store: Store, token: str, name: str, pending: bool = False, agent_token: str = "") -> str:
    """What Register does: check the token, then take its use with the agent's row."""
    token_id = store.check_join_token(token)
    return store.register_agent(
        name,
        agent_token or f"agent-token-{name}",
        b"",
        pending=pending,
        enrol=lambda c: store.join_tokens.use(c, token_id, store.clock()),
    )


def test_a_token_with_one_use_enrols_one_agent(store: Store) -> None:
    row, token = store.create_join_token(0, 1)
    assert (row.uses, row.max_uses, row.expires_at, row.revoked_at) == (0, 1, 0, 0)
    enrol(store, token, "a")
    with pytest.raises(Unauthenticated, match=f"join token {row.id} is used up \\(1 of 1 uses\\)"):
        enrol(store, token, "b")
    assert [(t.id, t.uses) for t in store.list_join_tokens()] == [(row.id, 1)]
    assert [a.name for a in store.list_agents()] == ["a"]


def test_the_use_is_taken_in_the_transaction_of_the_agents_row(store: Store) -> None:
    """Checked, then used up by another agent before this one's row is written: refused, no row;
    a name that is refused does not use the token up."""
    _, token = store.create_join_token(0, 1)
    token_id = store.check_join_token(token)
    store.register_agent("first", "t1", b"", enrol=lambda c: store.join_tokens.use(c, token_id, 1_000))
    with pytest.raises(Unauthenticated, match="used up"):
        store.register_agent("second", "t2", b"", enrol=lambda c: store.join_tokens.use(c, token_id, 1_000))
    assert [a.name for a in store.list_agents()] == ["first"]

    row2, token2 = store.create_join_token(0, 1)
    store.agent_online(store.agent_by_token("t1").id, b"", 2**62)  # type: ignore[union-attr]
    with pytest.raises(AlreadyExists):
        enrol(store, token2, "first")
    assert next(t for t in store.list_join_tokens() if t.id == row2.id).uses == 0


def test_expired_revoked_and_unknown_tokens_are_refused_saying_which(store: Store, clock: Clock) -> None:
    short, token = store.create_join_token(5_000, 0)
    clock.now += 5_000
    with pytest.raises(Unauthenticated, match=f"join token {short.id} expired"):
        store.check_join_token(token)
    revoked, token2 = store.create_join_token(0, 0)
    assert store.revoke_join_token(revoked.id).revoked_at == clock.now
    with pytest.raises(Unauthenticated, match=f"join token {revoked.id} was revoked"):
        store.check_join_token(token2)
    with pytest.raises(Unauthenticated, match="invalid join token"):
        store.check_join_token("guess")
    with pytest.raises(NotFound):
        store.revoke_join_token("nope")


def test_the_default_token_stays_revoked_while_its_value_is_the_same(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    s.ensure_default_join_token("server-token")
    assert s.check_join_token("server-token") == DEFAULT_ID
    s.revoke_join_token(DEFAULT_ID)
    s.close()
    s = Store(tmp_path / "db.sqlite")  # a restart: the same file, the same value
    s.ensure_default_join_token("server-token")
    with pytest.raises(Unauthenticated, match="join token default was revoked"):
        s.check_join_token("server-token")
    s.ensure_default_join_token("rotated-token")  # an admin put a new value in STATE_DIR/join-token
    assert s.check_join_token("rotated-token") == DEFAULT_ID
    with pytest.raises(Unauthenticated, match="invalid join token"):
        s.check_join_token("server-token")


def test_only_hashes_are_stored(store: Store, tmp_path: Path) -> None:
    store.ensure_default_join_token("server-token-value")
    _, token = store.create_join_token(0, 0)
    enrol(store, token, "a")
    store.close()
    data = b"".join(p.read_bytes() for p in tmp_path.glob("db.sqlite*"))
    for secret in ("server-token-value", token, "agent-token-a"):
        assert secret.encode() not in data
    assert hash_token(token).encode() in data


def test_a_removed_agent_fails_its_jobs_keeps_its_hash_and_frees_its_name(store: Store) -> None:
    store.ensure_default_join_token("j")
    agent_id = enrol(store, "j", "gpu-1")
    store.agent_online(agent_id, b"", 2**62)
    spec = common_pb2.JobSpec(job_name="a", commands=["sleep 1"]).SerializeToString()
    run = store.run_by_name(store.create_run("admin", "wf", b"", "", [], [NewJob("a", spec, 0, 0, 0, [])]).name)
    job_id = store.jobs_of_runs([run.id])[run.id][0].id
    store.apply_schedule([Placement(job_id, agent_id, [])], [], [])
    removal = store.remove_agent("gpu-1")
    assert removal.agent_id == agent_id and removal.failed_jobs == [job_id]
    job = store.jobs_of_runs([run.id])[run.id][0]
    assert job.status == JobStatus.FAILED and job.termination_reason == TerminationReason.AGENT_LOST
    assert job.message == "agent gpu-1 was removed by an admin"
    row = store.agent_by_token("agent-token-gpu-1")
    assert row is not None and row.status == "removed"  # so that its agent is told why
    assert store.agent_online(agent_id, b"", 2**62) == "removed"  # a hello cannot bring it back
    assert store.online_agents() == []
    with pytest.raises(NotFound, match="already removed"):
        store.remove_agent("gpu-1")
    new = enrol(store, "j", "gpu-1", agent_token="new")  # the name is free
    assert [(a.name, a.status) for a in store.list_agents()] == [("gpu-1", "removed"), ("gpu-1", "registered")]
    assert new != agent_id


def test_a_pending_agent_is_online_only_once_approved(store: Store) -> None:
    store.ensure_default_join_token("j")
    agent_id = enrol(store, "j", "fake", pending=True)
    assert store.agent_online(agent_id, b"inventory", 2**62) == "pending"
    assert store.online_agents() == []
    [row] = store.list_agents()
    assert (row.status, row.inventory) == ("pending", b"inventory")  # the admin sees what it claims
    store.approve_agent("fake", lambda _id: True, 2**62)
    assert [a.id for a in store.online_agents()] == [agent_id]
    with pytest.raises(Conflict, match="not waiting for approval"):
        store.approve_agent("fake", lambda _id: True, 2**62)
    other = enrol(store, "j", "away", pending=True)
    store.approve_agent("away", lambda _id: False, 2**62)  # not connected: online at its hello
    assert store.agent_online(other, b"", 2**62) == "online"


def test_migration_6_upgrades_a_version_5_database(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE join_tokens")
    conn.execute("DROP INDEX agents_pool_name")
    conn.execute("CREATE UNIQUE INDEX agents_live_name ON agents (name) WHERE status != 'retired'")
    conn.execute(
        "INSERT INTO agents (id, name, token_hash, status) VALUES ('old', 'gpu-1', ?, 'online')", [hash_token("t")]
    )
    conn.execute("PRAGMA user_version = 5")
    conn.commit()
    conn.close()
    s = Store(path)
    s.ensure_default_join_token("j")
    assert s.agent_by_token("t") is not None  # its agents keep their credentials
    s.remove_agent("gpu-1")
    enrol(s, "j", "gpu-1", agent_token="new")  # the removed one no longer holds the name
    names = {r[0] for r in s.conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "agents_pool_name" in names and "agents_live_name" not in names
