"""Secrets, stored encrypted (coordinator/secrets.py): the database never holds a value in the clear."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from dstack.coordinator.errors import NotFound
from dstack.coordinator.store.base import Db


@dataclass(frozen=True)
class SecretRow:
    name: str
    created_at: int
    updated_at: int

    @classmethod
    def of(cls, r: sqlite3.Row) -> SecretRow:
        return cls(r["name"], r["created_at"], r["updated_at"])


class Secrets:
    def __init__(self, db: Db) -> None:
        self.db = db

    def put(self, name: str, ciphertext: bytes) -> SecretRow:
        now = self.db.clock()
        with self.db.tx() as c:
            c.execute(
                "INSERT INTO secrets (name, ciphertext, created_at, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET ciphertext = excluded.ciphertext, updated_at = excluded.updated_at",
                [name, ciphertext, now, now],
            )
        row = self.db.row("SELECT name, created_at, updated_at FROM secrets WHERE name = ?", [name])
        assert row is not None
        return SecretRow.of(row)

    def all(self) -> list[SecretRow]:
        return [SecretRow.of(r) for r in self.db.rows("SELECT name, created_at, updated_at FROM secrets ORDER BY name")]

    def ciphertexts(self) -> list[tuple[str, bytes]]:
        return [(r["name"], r["ciphertext"]) for r in self.db.rows("SELECT name, ciphertext FROM secrets")]

    def delete(self, name: str) -> None:
        with self.db.tx() as c:
            if c.execute("DELETE FROM secrets WHERE name = ? RETURNING name", [name]).fetchone() is None:
                raise NotFound(f"secret {name!r} does not exist (see `dstack secrets list`)")
