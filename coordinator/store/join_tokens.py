"""Join tokens: what an agent shows to enrol (Register). Only a token's sha256 is stored; a token is
256 random bits, so a plain hash is as good as a slow one.

Each has an expiry (0: never), a use limit (0: unlimited) and may be revoked. A Register uses one
up with one guarded UPDATE, so two agents racing for a token's last use cannot both win. The server's
own token (STATE_DIR/join-token or DSTACK_JOIN_TOKEN) is the row 'default': no expiry, no limit; once
revoked it stays revoked across restarts for as long as its value is the same.
"""

from __future__ import annotations

import secrets
import sqlite3
from dataclasses import dataclass
from typing import Any

from dstack.coordinator.errors import NotFound, Unauthenticated
from dstack.coordinator.store.base import Db
from dstack.coordinator.store.users import hash_token

DEFAULT_ID = "default"
_COLUMNS = "id, created_at, expires_at, max_uses, uses, revoked_at"


@dataclass(frozen=True)
class JoinTokenRow:
    id: str
    created_at: int
    expires_at: int  # 0: never
    max_uses: int  # 0: unlimited
    uses: int
    revoked_at: int  # 0: not revoked

    @classmethod
    def of(cls, r: Any) -> JoinTokenRow:  # a sqlite3.Row or a plain tuple, in _COLUMNS' order
        return cls(str(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4]), int(r[5]))

    def refusal(self, now: int) -> str | None:
        """Why this token cannot enrol an agent now; None if it can."""
        if self.revoked_at:
            return f"join token {self.id} was revoked; ask an admin for a new one (`dstack join-tokens create`)"
        if self.expires_at and self.expires_at <= now:
            return f"join token {self.id} expired; ask an admin for a new one (`dstack join-tokens create`)"
        if self.max_uses and self.uses >= self.max_uses:
            return (
                f"join token {self.id} is used up ({self.uses} of {self.max_uses} uses); ask an admin for a new one"
                " (`dstack join-tokens create`)"
            )
        return None


UNKNOWN = "invalid join token: the coordinator does not know it (ask an admin: `dstack join-tokens create`)"


class JoinTokens:
    def __init__(self, db: Db) -> None:
        self.db = db

    def ensure_default(self, token: str) -> None:
        """The server's own token, as row 'default'. A changed value is a new token: not revoked."""
        with self.db.tx() as c:
            c.execute(
                "INSERT INTO join_tokens (id, token_hash, created_at, expires_at, max_uses, uses, revoked_at)"
                " VALUES (:id, :h, :now, 0, 0, 0, 0) ON CONFLICT(id) DO UPDATE SET"
                " revoked_at = CASE WHEN token_hash = excluded.token_hash THEN revoked_at ELSE 0 END,"
                " created_at = CASE WHEN token_hash = excluded.token_hash THEN created_at ELSE excluded.created_at END,"
                " token_hash = excluded.token_hash",
                {"id": DEFAULT_ID, "h": hash_token(token), "now": self.db.clock()},
            )

    def create(self, ttl_ns: int, max_uses: int) -> tuple[JoinTokenRow, str]:
        """A new token: its row and its value (which is not stored)."""
        token = secrets.token_urlsafe(32)
        token_id = secrets.token_hex(4)
        now = self.db.clock()
        with self.db.tx() as c:
            row = c.execute(
                "INSERT INTO join_tokens (id, token_hash, created_at, expires_at, max_uses, uses, revoked_at)"
                f" VALUES (?, ?, ?, ?, ?, 0, 0) RETURNING {_COLUMNS}",
                [token_id, hash_token(token), now, now + ttl_ns if ttl_ns else 0, max_uses],
            ).fetchone()
        return JoinTokenRow.of(row), token

    def all(self) -> list[JoinTokenRow]:
        return [JoinTokenRow.of(r) for r in self.db.rows(f"SELECT {_COLUMNS} FROM join_tokens ORDER BY created_at, id")]

    def revoke(self, token_id: str) -> JoinTokenRow:
        with self.db.tx() as c:
            c.execute(
                "UPDATE join_tokens SET revoked_at = ? WHERE id = ? AND revoked_at = 0", [self.db.clock(), token_id]
            )
            row = c.execute(f"SELECT {_COLUMNS} FROM join_tokens WHERE id = ?", [token_id]).fetchone()
        if row is None:
            raise NotFound(f"no join token {token_id} (`dstack join-tokens list` shows them)")
        return JoinTokenRow.of(row)

    def check(self, token: str) -> str:
        """The id of a token that can enrol an agent now, or Unauthenticated saying why not (the
        interceptor's check, before a Register's body is read; the use is taken by `use`)."""
        row = self.db.row(f"SELECT {_COLUMNS} FROM join_tokens WHERE token_hash = ?", [hash_token(token)])
        if row is None:
            raise Unauthenticated(UNKNOWN)
        found = JoinTokenRow.of(row)
        why = found.refusal(self.db.clock())
        if why is not None:
            raise Unauthenticated(why)
        return found.id

    def use(self, c: sqlite3.Connection, token_id: str, now: int) -> None:
        """Takes one use of the token inside the caller's transaction, or raises Unauthenticated
        saying why it cannot (revoked, expired or used up since it was checked)."""
        taken = c.execute(
            "UPDATE join_tokens SET uses = uses + 1 WHERE id = :id AND revoked_at = 0"
            " AND (expires_at = 0 OR expires_at > :now) AND (max_uses = 0 OR uses < max_uses) RETURNING id",
            {"id": token_id, "now": now},
        ).fetchone()
        if taken is not None:
            return
        row = c.execute(f"SELECT {_COLUMNS} FROM join_tokens WHERE id = ?", [token_id]).fetchone()
        if row is None:
            raise Unauthenticated(UNKNOWN)
        raise Unauthenticated(JoinTokenRow.of(row).refusal(now) or UNKNOWN)
