"""Secrets, stored encrypted (coordinator/secrets.py): the database never holds a value in the clear.

A secret is keyed by (owner, name): owner '' for a team secret, else the user whose personal
secret it is (it overrides a team secret of the same name in that user's jobs only).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from dstack.coordinator.errors import NotFound
from dstack.coordinator.store.base import Db

TEAM = ""  # the owner of a team secret


@dataclass(frozen=True)
class SecretRow:
    name: str
    owner: str  # TEAM or a user's name
    created_at: int
    updated_at: int

    @property
    def personal(self) -> bool:
        return self.owner != TEAM

    @classmethod
    def of(cls, r: sqlite3.Row) -> SecretRow:
        return cls(r["name"], r["owner"], r["created_at"], r["updated_at"])


_COLUMNS = "name, owner, created_at, updated_at"


def _what(owner: str, name: str) -> str:
    return f"team secret {name!r}" if owner == TEAM else f"personal secret {name!r} of {owner}"


class Secrets:
    def __init__(self, db: Db) -> None:
        self.db = db

    def put(self, name: str, ciphertext: bytes, owner: str = TEAM) -> SecretRow:
        now = self.db.clock()
        with self.db.tx() as c:
            c.execute(
                "INSERT INTO secrets (owner, name, ciphertext, created_at, updated_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(owner, name) DO UPDATE SET ciphertext = excluded.ciphertext,"
                " updated_at = excluded.updated_at",
                [owner, name, ciphertext, now, now],
            )
        row = self.db.row(f"SELECT {_COLUMNS} FROM secrets WHERE owner = ? AND name = ?", [owner, name])
        assert row is not None
        return SecretRow.of(row)

    def all(self) -> list[SecretRow]:
        return [SecretRow.of(r) for r in self.db.rows(f"SELECT {_COLUMNS} FROM secrets ORDER BY name, owner")]

    def names(self, owner: str) -> list[SecretRow]:
        """The team's secrets and `owner`'s personal ones (what `dstack secrets list` shows that user)."""
        return [
            SecretRow.of(r)
            for r in self.db.rows(
                f"SELECT {_COLUMNS} FROM secrets WHERE owner IN ('', ?) ORDER BY name, owner", [owner]
            )
        ]

    def ciphertexts(self) -> list[tuple[str, str, bytes]]:
        """Every secret as (owner, name, ciphertext)."""
        return [
            (r["owner"], r["name"], r["ciphertext"])
            for r in self.db.rows("SELECT owner, name, ciphertext FROM secrets")
        ]

    def delete(self, name: str, owner: str = TEAM) -> None:
        with self.db.tx() as c:
            found = c.execute("DELETE FROM secrets WHERE owner = ? AND name = ? RETURNING name", [owner, name])
            if found.fetchone() is None:
                raise NotFound(f"{_what(owner, name)} does not exist (see `dstack secrets list`)")
