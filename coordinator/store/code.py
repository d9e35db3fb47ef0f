"""Code blobs: which packed code archives (by sha256) are in the object store.

`created_at` is when a blob was last asked for (stored, looked up, or named by a new run): the garbage
collector (coordinator/gc.py) removes a blob no run names only once that is older than its grace period,
so a client between its HasCode and its SubmitRun never loses the blob it was told is there."""

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

    def touch(self, code_hash: str) -> bool:
        """Whether the blob is known; if so, it was just asked for (the collector's grace starts again)."""
        with self.db.tx() as c:
            cur = c.execute("UPDATE code SET created_at = ? WHERE hash = ?", [self.db.clock(), code_hash])
            return cur.rowcount > 0

    def unreferenced(self, idle_before: int) -> list[str]:
        """Blobs no run names that nobody asked for since `idle_before`."""
        rows = self.db.conn.execute(
            "SELECT hash FROM code WHERE created_at < ?"
            " AND hash NOT IN (SELECT code_hash FROM runs WHERE code_hash IS NOT NULL AND code_hash != '')",
            [idle_before],
        )
        return [r[0] for r in rows]

    def forget_if_unreferenced(self, code_hash: str, idle_before: int) -> bool:
        """Removes the blob's row if it is still unreferenced and idle (checked and done in one step on the
        DB thread, so a run created meanwhile keeps it); True when removed."""
        with self.db.tx() as c:
            cur = c.execute(
                "DELETE FROM code WHERE hash = ? AND created_at < ?"
                " AND NOT EXISTS (SELECT 1 FROM runs WHERE code_hash = ?)",
                [code_hash, idle_before, code_hash],
            )
            return cur.rowcount > 0

    def known(self, hashes: list[str]) -> set[str]:
        out: set[str] = set()
        for i in range(0, len(hashes), 500):
            part = hashes[i : i + 500]
            marks = ",".join("?" * len(part))
            out |= {r[0] for r in self.db.conn.execute(f"SELECT hash FROM code WHERE hash IN ({marks})", part)}
        return out
