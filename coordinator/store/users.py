"""Users and their API tokens (only a token's sha256 is stored)."""

from __future__ import annotations

import hashlib

from dstack.coordinator.store.base import Db


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Users:
    def __init__(self, db: Db) -> None:
        self.db = db

    def ensure(self, name: str, token: str, role: str) -> None:
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
        """The token's user and role ('admin' or another), or None."""
        row = self.db.row("SELECT name, role FROM users WHERE token_hash = ?", [hash_token(token)])
        return None if row is None else (str(row["name"]), str(row["role"] or ""))
