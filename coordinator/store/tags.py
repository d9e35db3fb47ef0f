"""Tags: names for runs that finished done (`dstack tags`, `dstack run -t TAG`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from dstack.coordinator.errors import Conflict, NotFound
from dstack.coordinator.model import RunStatus
from dstack.coordinator.store.base import Db
from dstack.coordinator.store.runs import Runs

_SELECT = (
    "SELECT t.name, t.created_at, r.id AS run_id, r.name AS run_name, r.workflow FROM tags t"
    " JOIN runs r ON r.id = t.run_id"
)


@dataclass(frozen=True)
class TagRow:
    name: str
    created_at: int
    run_id: str
    run_name: str
    workflow: str

    @classmethod
    def of(cls, r: sqlite3.Row) -> TagRow:
        return cls(r["name"], r["created_at"], r["run_id"], r["run_name"], r["workflow"])


class Tags:
    def __init__(self, db: Db, runs: Runs) -> None:
        self.db = db
        self.runs = runs

    def add(self, tag: str, run_name: str) -> TagRow:
        run = self.runs.by_name(run_name)
        if run.status != RunStatus.DONE:
            state = "has not finished" if run.finished_at is None else "did not finish done"
            raise Conflict(f"run {run_name!r} {state}: only runs that finished done can be tagged")
        with self.db.tx() as c:
            if c.execute("SELECT 1 FROM tags WHERE name = ?", [tag]).fetchone():
                raise Conflict(f"tag {tag!r} already exists: delete it first (`dstack tags delete {tag}`)")
            c.execute("INSERT INTO tags (name, run_id, created_at) VALUES (?, ?, ?)", [tag, run.id, self.db.clock()])
        return self.get(tag)

    def get(self, tag: str) -> TagRow:
        row = self.db.row(f"{_SELECT} WHERE t.name = ?", [tag])
        if row is None:
            raise NotFound(f"tag {tag!r} does not exist (see `dstack tags list`)")
        return TagRow.of(row)

    def all(self) -> list[TagRow]:
        return [TagRow.of(r) for r in self.db.rows(f"{_SELECT} ORDER BY t.name")]

    def delete(self, tag: str) -> None:
        with self.db.tx() as c:
            if c.execute("DELETE FROM tags WHERE name = ? RETURNING name", [tag]).fetchone() is None:
                raise NotFound(f"tag {tag!r} does not exist (see `dstack tags list`)")

    def of_runs(self, run_ids: Sequence[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {r: [] for r in run_ids}
        if not run_ids:
            return out
        marks = ",".join("?" for _ in run_ids)
        for r in self.db.rows(f"SELECT name, run_id FROM tags WHERE run_id IN ({marks})", list(run_ids)):
            out[r["run_id"]].append(r["name"])
        return out
