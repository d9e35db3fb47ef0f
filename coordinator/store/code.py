"""Code blobs: which packed code archives (by sha256) are in the object store."""

from __future__ import annotations

from dstack.coordinator.store.base import Db


class CodeBlobs:
    def __init__(self, db: Db) -> None:
        self.db = db

    def has(self, code_hash: str) -> bool:
        return self.db.row("SELECT 1 AS x FROM code WHERE hash = ?", [code_hash]) is not None

    def add(self, code_hash: str, size: int) -> None:
        with self.db.tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO code (hash, size, created_at) VALUES (?, ?, ?)",
                [code_hash, size, self.db.clock()],
            )
