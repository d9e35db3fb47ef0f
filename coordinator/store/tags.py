"""Tags: names for runs that finished done (`dstack tags`, `dstack run -t TAG`), unique within a repository."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dstack.coordinator.errors import Conflict, InvalidRequest, NotFound
from dstack.coordinator.model import RunStatus
from dstack.coordinator.repositories import resolve_qualifier
from dstack.coordinator.store.base import Db
from dstack.coordinator.store.runs import Runs
from dstack.protos.repos import LEGACY, BadRef, reads_legacy, split_ref

_SELECT = (
    "SELECT t.repository, t.name, t.created_at, r.id AS run_id, r.name AS run_name, r.workflow FROM tags t"
    " JOIN runs r ON r.id = t.run_id"
)


@dataclass(frozen=True)
class TagRow:
    name: str
    created_at: int
    run_id: str
    run_name: str
    workflow: str
    repository: str

    @classmethod
    def of(cls, r: sqlite3.Row) -> TagRow:
        return cls(r["name"], r["created_at"], r["run_id"], r["run_name"], r["workflow"], r["repository"])


class Tags:
    def __init__(self, db: Db, runs: Runs) -> None:
        self.db = db
        self.runs = runs

    def add(self, tag: str, run_name: str) -> TagRow:
        """Tags a run in its own repository."""
        run = self.runs.by_name(run_name)
        if run.status != RunStatus.DONE:
            state = "has not finished" if run.finished_at is None else "did not finish done"
            raise Conflict(f"run {run_name!r} {state}: only runs that finished done can be tagged")
        with self.db.tx() as c:
            if c.execute("SELECT 1 FROM tags WHERE repository = ? AND name = ?", [run.repository, tag]).fetchone():
                raise Conflict(
                    f"tag {tag!r} already exists in repository {run.repository}: delete it first"
                    f" (`dstack tags delete {tag}` there)"
                )
            c.execute(
                "INSERT INTO tags (repository, name, run_id, created_at) VALUES (?, ?, ?, ?)",
                [run.repository, tag, run.id, self.db.clock()],
            )
        return self.get(run.repository, tag)

    def get(self, repository: str, tag: str) -> TagRow:
        row = self.db.row(f"{_SELECT} WHERE t.repository = ? AND t.name = ?", [repository, tag])
        if row is None:
            raise NotFound(f"tag {tag!r} does not exist in repository {repository} (see `dstack tags list`)")
        return TagRow.of(row)

    def resolve(self, repository: str, ref: str) -> TagRow:
        """The tag a reference names from a run of `repository`: `TAG` there (else, for a folder without a
        remote, in `legacy`: protos/repos.py `reads_legacy`), or `OWNER/REPO/TAG` in that repository."""
        try:
            parsed = split_ref(ref)
        except BadRef as e:
            raise InvalidRequest(str(e)) from None
        if parsed.repository:
            return self.get(resolve_qualifier(parsed.repository, self.runs.repositories()), parsed.name)
        try:
            return self.get(repository, parsed.name)
        except NotFound:
            if not reads_legacy(repository):
                raise
            legacy = self.db.row(f"{_SELECT} WHERE t.repository = ? AND t.name = ?", [LEGACY, parsed.name])
            if legacy is None:
                raise
            return TagRow.of(legacy)

    def all(self, repository: str | None = None) -> list[TagRow]:
        """The tags of one repository, or of every one (None)."""
        if repository is None:
            return [TagRow.of(r) for r in self.db.rows(f"{_SELECT} ORDER BY t.repository, t.name")]
        return [TagRow.of(r) for r in self.db.rows(f"{_SELECT} WHERE t.repository = ? ORDER BY t.name", [repository])]

    def delete(self, repository: str | None, ref: str, check: Callable[[TagRow], None] | None = None) -> TagRow:
        """Deletes `TAG` of `repository` (or `OWNER/REPO/TAG`). With no repository (a client from before
        repositories), the tag of that name wherever it is, if it is in one repository only. `check`
        sees the tag found before it is deleted, and may refuse (the caller's ownership check)."""
        try:
            parsed = split_ref(ref)
        except BadRef as e:
            raise InvalidRequest(str(e)) from None
        if parsed.repository:
            repository = resolve_qualifier(parsed.repository, self.runs.repositories())
        elif repository is None:
            found = [r["repository"] for r in self.db.rows("SELECT repository FROM tags WHERE name = ?", [ref])]
            if len(found) > 1:
                raise InvalidRequest(
                    f"tag {ref!r} exists in several repositories ({', '.join(sorted(found))}): name one,"
                    f" e.g. {sorted(found)[0]}/{ref}"
                )
            repository = found[0] if found else LEGACY
        try:
            row = self.get(repository, parsed.name)
        except NotFound as e:
            elsewhere = self._repositories_with(parsed.name)
            if parsed.repository or not elsewhere:
                raise
            # `dstack tags delete` works in the current project's repository: say where the tag is.
            raise NotFound(
                f"{e}; it is in {', '.join(elsewhere)}: delete it from that project, or as"
                f" `dstack tags delete {elsewhere[0]}/{parsed.name}`"
            ) from None
        if check is not None:
            check(row)
        with self.db.tx() as c:
            c.execute("DELETE FROM tags WHERE repository = ? AND name = ?", [repository, parsed.name])
        return row

    def _repositories_with(self, tag: str) -> list[str]:
        return [r["repository"] for r in self.db.rows("SELECT repository FROM tags WHERE name = ? ORDER BY 1", [tag])]

    def of_runs(self, run_ids: Sequence[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {r: [] for r in run_ids}
        if not run_ids:
            return out
        marks = ",".join("?" for _ in run_ids)
        for r in self.db.rows(f"SELECT name, run_id FROM tags WHERE run_id IN ({marks})", list(run_ids)):
            out[r["run_id"]].append(r["name"])
        return out
