"""The users and secrets tables: tokens kept only as hashes, roles, the migration to scoped secrets."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlite_utils

from dstack.coordinator.errors import AlreadyExists, Conflict, NotFound
from dstack.coordinator.store import Store
from dstack.coordinator.store.schema import MIGRATIONS, _users_and_scoped_secrets


def test_a_database_of_team_wide_secrets_migrates_to_team_secrets(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    old = sqlite_utils.Database(conn)
    before_scopes = MIGRATIONS.index(_users_and_scoped_secrets)  # the migration to scoped secrets
    for version, migration in enumerate(MIGRATIONS[:before_scopes], start=1):
        migration(old)
        old.execute(f"PRAGMA user_version = {version}")
    conn.execute("INSERT INTO secrets (name, ciphertext, created_at, updated_at) VALUES ('WANDB', x'01', 1, 2)")
    conn.execute("INSERT INTO users (name, token_hash, role, created_at) VALUES ('admin', 'h', 'admin', 1)")
    conn.close()

    store = Store(path)
    try:
        [row] = store.secrets.all()
        assert (row.name, row.owner, row.personal, row.created_at, row.updated_at) == ("WANDB", "", False, 1, 2)
        assert store.secret_ciphertexts() == [("", "WANDB", b"\x01")]
        # A personal secret of the same name is a second row; the team's stays.
        store.put_secret("WANDB", b"\x02", "alice")
        assert [(s.name, s.owner) for s in store.secret_names("alice")] == [("WANDB", ""), ("WANDB", "alice")]
        assert [(s.name, s.owner) for s in store.secret_names("bob")] == [("WANDB", "")]
        [admin] = store.list_users()
        assert (admin.name, admin.role, admin.last_seen_at) == ("admin", "admin", 0)
    finally:
        store.close()


def test_users_tokens_are_hashed_and_changes_bump_the_generation(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    try:
        store.ensure_user("admin", "admin-token", "admin")
        g = store.users.generation
        alice, token = store.add_user("alice", "member")
        assert (alice.name, alice.role) == ("alice", "member") and len(token) >= 43  # 256 bits, url-safe base64
        assert store.user_with_role(token) == ("alice", "member")
        with pytest.raises(AlreadyExists):
            store.add_user("alice", "viewer")
        _, new = store.rotate_user_token("alice")
        assert store.users.generation > g and store.user_with_role(token) is None
        assert store.user_with_role(new) == ("alice", "member")
        store.put_secret("MINE", b"\x03", "alice")
        g = store.users.generation
        store.remove_user("alice")
        assert store.users.generation > g and store.user_with_role(new) is None
        assert store.secret_ciphertexts() == []  # her personal secrets went with her
        with pytest.raises(NotFound):
            store.rotate_user_token("alice")
        with pytest.raises(Conflict, match="last admin"):
            store.remove_user("admin")
        rows = store.conn.execute("SELECT * FROM users").fetchall()
        assert "admin-token" not in repr(rows) and new not in repr(rows)
    finally:
        store.close()


def test_a_role_written_before_roles_had_names_reads_as_member(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    try:
        store.ensure_user("old", "old-token", "user")
        assert store.user_with_role("old-token") == ("old", "member")
    finally:
        store.close()
