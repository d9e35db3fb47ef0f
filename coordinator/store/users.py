"""Users, their roles and their API tokens (only a token's sha256 is stored).

`generation` counts the changes to who holds which token and role: the coordinator's token cache
(coordinator/auth.py) compares it on every hit, so a removal, a rotation or a role change made in
this process is in force for the very next call.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from dataclasses import dataclass

from dstack.coordinator.errors import AlreadyExists, Conflict, NotFound
from dstack.coordinator.store.base import Db

ADMIN, MEMBER, VIEWER = "admin", "member", "viewer"
ROLES = (ADMIN, MEMBER, VIEWER)
SERVER_ADMIN = "admin"  # the user that holds the server's own token (STATE_DIR/admin-token or DSTACK_ADMIN_TOKEN)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)  # 256 random bits


def role_of(stored: str | None) -> str:
    """A stored role as one of ROLES: rows written before roles had names (e.g. 'user') are members."""
    return stored if stored in ROLES else MEMBER


@dataclass(frozen=True)
class UserRow:
    name: str
    role: str
    created_at: int
    last_seen_at: int  # 0: never

    @classmethod
    def of(cls, r: sqlite3.Row) -> UserRow:
        return cls(r["name"], role_of(r["role"]), r["created_at"] or 0, r["last_seen_at"] or 0)


_COLUMNS = "name, role, created_at, last_seen_at"


class Users:
    def __init__(self, db: Db) -> None:
        self.db = db
        self.generation = 0

    def _changed(self) -> None:
        # Bumped before the change commits, on the DB thread: a lookup that raced with it is not cached.
        self.generation += 1

    def ensure(self, name: str, token: str, role: str) -> None:
        self._changed()
        with self.db.tx() as c:
            c.execute(
                "INSERT INTO users (name, token_hash, role, created_at) VALUES (:n, :h, :r, :t)"
                " ON CONFLICT(name) DO UPDATE SET token_hash = :h, role = :r",
                {"n": name, "h": hash_token(token), "r": role, "t": self.db.clock()},
            )

    def for_token(self, token: str) -> str | None:
        row = self.db.row("SELECT name FROM users WHERE token_hash = ?", [hash_token(token)])
        return None if row is None else str(row["name"])

    def with_role(self, token: str) -> tuple[str, str] | None:
        """The token's user and role (one of ROLES), or None."""
        row = self.db.row("SELECT name, role FROM users WHERE token_hash = ?", [hash_token(token)])
        return None if row is None else (str(row["name"]), role_of(row["role"]))

    def by_token_hash(self, token_hash: str) -> tuple[str, str] | None:
        row = self.db.row("SELECT name, role FROM users WHERE token_hash = ?", [token_hash])
        return None if row is None else (str(row["name"]), role_of(row["role"]))

    def get(self, name: str) -> UserRow:
        row = self.db.row(f"SELECT {_COLUMNS} FROM users WHERE name = ?", [name])
        if row is None:
            raise NotFound(f"user {name!r} does not exist (see `dstack users list`)")
        return UserRow.of(row)

    def all(self) -> list[UserRow]:
        return [UserRow.of(r) for r in self.db.rows(f"SELECT {_COLUMNS} FROM users ORDER BY name")]

    def add(self, name: str, role: str) -> tuple[UserRow, str]:
        """A new user and its token (returned this once)."""
        token = new_token()
        with self.db.tx() as c:
            if c.execute("SELECT 1 FROM users WHERE name = ?", [name]).fetchone():
                raise AlreadyExists(
                    f"user {name!r} already exists (`dstack users rotate-token {name}` for a new token)"
                )
            c.execute(
                "INSERT INTO users (name, token_hash, role, created_at) VALUES (?, ?, ?, ?)",
                [name, hash_token(token), role, self.db.clock()],
            )
        return self.get(name), token

    def remove(self, name: str) -> None:
        """Removes the user (never the last admin) and their personal secrets."""
        self._changed()
        with self.db.tx() as c:
            row = c.execute("SELECT role FROM users WHERE name = ?", [name]).fetchone()
            if row is None:
                raise NotFound(f"user {name!r} does not exist (see `dstack users list`)")
            if role_of(row[0]) == ADMIN:
                admins = c.execute("SELECT COUNT(*) FROM users WHERE role = ?", [ADMIN]).fetchone()[0]
                if admins <= 1:
                    raise Conflict(f"user {name!r} is the last admin: add another admin first")
            c.execute("DELETE FROM users WHERE name = ?", [name])
            # Their personal secrets go with them (secrets.owner, coordinator/store/secrets.py).
            c.execute("DELETE FROM secrets WHERE owner = ?", [name])

    def rotate(self, name: str) -> tuple[UserRow, str]:
        """A new token for the user (returned this once); the old one is refused from now on."""
        token = new_token()
        self._changed()
        with self.db.tx() as c:
            if (
                c.execute(
                    "UPDATE users SET token_hash = ? WHERE name = ? RETURNING name", [hash_token(token), name]
                ).fetchone()
                is None
            ):
                raise NotFound(f"user {name!r} does not exist (see `dstack users list`)")
        return self.get(name), token

    def touch(self, name: str, at: int) -> None:
        """Records a call by the user (the caller rate-limits this: it is a write)."""
        with self.db.tx() as c:
            c.execute("UPDATE users SET last_seen_at = ? WHERE name = ?", [at, name])
