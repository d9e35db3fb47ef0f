"""Runs: creation (with their jobs), reads, stop requests, deletion and retention bookkeeping."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import NamedTuple

from dstack.coordinator import lifecycle
from dstack.coordinator.attempts import wire_job_id
from dstack.coordinator.errors import Conflict, InvalidRequest, NotFound
from dstack.coordinator.ids import new_id
from dstack.coordinator.model import ON_AGENT, TERMINAL_RUN, WAITING, RunStatus, TerminationReason
from dstack.coordinator.names import random_run_prefix
from dstack.coordinator.repositories import resolve_qualifier
from dstack.coordinator.store.base import Db, ints_in, json_list, stored_reason
from dstack.protos.repos import LEGACY, BadRef, reads_legacy, split_ref

_COLUMNS = (
    "id, name, owner, workflow, status, termination_reason, message, submitted_at, finished_at, code_hash, code,"
    " args, queue, priority, tag_on_done, artifacts_deleted, kind, repository"
)


RECENT_FINISHED = 10  # finished runs `dstack ps` shows (without -a)
PAGE_PHASES = ("all", "active", "finished")


@dataclass(frozen=True)
class RunsPage:
    rows: list[RunRow]
    next_token: str  # "" after the last page
    # Asked for (`with_finished`): the latest finished runs when `rows` stopped before them, else empty.
    finished: list[RunRow] = field(default_factory=list)


def _parse_page_token(token: str, first: str) -> tuple[str, tuple[int, str] | None]:
    """PHASE:SUBMITTED_AT:ID (the last run sent), or PHASE:: (the phase's start); "" is `first`'s start."""
    if not token:
        return first, None
    phase, at, run_id = [*token.split(":", 2), "", ""][:3]
    if phase not in PAGE_PHASES or (first == "all") != (phase == "all"):
        raise InvalidRequest(f"invalid page token {token[:80]!r}: pass the next_page_token of the same listing")
    if not at and not run_id:
        return phase, None
    try:
        return phase, (int(at), run_id)
    except ValueError:
        raise InvalidRequest(f"invalid page token {token[:80]!r}") from None


@dataclass(frozen=True)
class RunFilters:
    """Which runs a listing shows; an empty field does not filter."""

    owners: tuple[str, ...] = ()
    workflows: tuple[str, ...] = ()
    statuses: tuple[RunStatus, ...] = ()
    repository: str = ""


# The name of a run with an unfinished job that takes run `r.id` as an input (store/artifacts.inputs_of).
_INPUT_OF_UNFINISHED = (
    "SELECT t.name FROM jobs j JOIN runs t ON t.id = j.run_id, json_each(j.inputs) i"
    " WHERE i.value = r.id AND j.finished_at IS NULL LIMIT 1"
)


@dataclass(frozen=True)
class RunRow:
    id: str
    name: str
    owner: str
    workflow: str
    status: RunStatus
    termination_reason: TerminationReason
    message: str
    submitted_at: int
    finished_at: int | None
    code_hash: str
    code: bytes  # a serialized dstack.v1.CodeRef, kept opaque
    args: list[str]
    queue: str
    priority: int
    tag_on_done: str  # "" for none
    artifacts_deleted: bool
    kind: str  # "" for an executed workflow, "upload" for an uploaded artifact set
    repository: str  # the namespace of its workflow name and tags (coordinator/repositories.py)

    @classmethod
    def of(cls, r: sqlite3.Row) -> RunRow:
        return cls(
            id=r["id"],
            name=r["name"],
            owner=r["owner"],
            workflow=r["workflow"],
            status=_RUN_STATUS[r["status"]],  # dict lookups, not the enums' calls (GetRun reads a run per call)
            termination_reason=stored_reason(r["termination_reason"]),
            message=r["message"] or "",
            submitted_at=r["submitted_at"],
            finished_at=r["finished_at"],
            code_hash=r["code_hash"] or "",
            code=r["code"] or b"",
            args=json_list(r["args"]),
            queue=r["queue"] or "",
            priority=r["priority"] or 0,
            tag_on_done=r["tag_on_done"] or "",
            artifacts_deleted=bool(r["artifacts_deleted"]),
            kind=r["kind"] or "",
            repository=r["repository"],
        )


_RUN_STATUS = {int(s): s for s in RunStatus}


@dataclass(frozen=True)
class NewJob:
    job_name: str
    spec: bytes  # a serialized dstack.v1.JobSpec, kept opaque
    cpu: float
    memory: int
    gpu_count: int
    depends_on: list[str]
    inputs: list[str] = field(default_factory=list)  # ids of runs whose artifacts the job takes
    gang: str = ""  # a multi-node gang's shared name ("" for a job of its own), and this member's rank
    node_rank: int = 0
    cache_base: str = ""  # the step cache's key base, known at submission (coordinator/cache.py); "": not keyed


@dataclass(frozen=True)
class CreatedRun:
    run_id: str
    name: str
    job_ids: list[str]  # in the order the jobs were given
    submitted_at: int


@dataclass(frozen=True)
class ExpiredRun:
    """A finished run past retention, with what of it is still kept."""

    id: str
    name: str
    artifacts_deleted: bool
    tagged: bool
    has_logs: bool


class StopOnAgent(NamedTuple):
    job_id: str  # the id the agent knows the job's current attempt by (coordinator/attempts.py)
    agent_id: str


class Runs:
    def __init__(self, db: Db) -> None:
        self.db = db

    def reserve_name(self) -> str:
        """A new readable name (adjective-animal-N); never handed out twice."""
        prefix = random_run_prefix()
        with self.db.tx() as c:
            n = c.execute(
                "INSERT INTO run_name_counters (prefix, n) VALUES (?, 1)"
                " ON CONFLICT(prefix) DO UPDATE SET n = n + 1 RETURNING n",
                [prefix],
            ).fetchone()[0]
        return f"{prefix}-{n}"

    def create(
        self,
        owner: str,
        workflow: str,
        code: bytes,
        code_hash: str,
        args: list[str],
        jobs: list[NewJob],
        name: str | None = None,
        tag_on_done: str = "",
        priority: int = 0,
        repository: str = LEGACY,
    ) -> CreatedRun:
        """Inserts a run and its jobs in one transaction (under `name`, or a new one)."""
        now = self.db.clock()
        run_id = new_id()
        job_ids = [new_id() for _ in jobs]
        name = name or self.reserve_name()
        with self.db.tx() as c:
            c.execute(
                "INSERT INTO runs (id, name, owner, workflow, status, termination_reason, message,"
                " submitted_at, code_hash, code, args, queue, priority, tag_on_done, repository) VALUES (:id, :name,"
                " :owner, :wf, :st, 0, '', :now, :ch, :code, :args, '', :prio, :tag, :repo)",
                {
                    "id": run_id,
                    "name": name,
                    "owner": owner,
                    "wf": workflow,
                    "st": int(lifecycle.SUBMIT_RUN.dst),
                    "now": now,
                    "ch": code_hash,
                    "code": code,
                    "args": json.dumps(args),
                    "tag": tag_on_done or None,
                    "prio": priority,
                    "repo": repository,
                },
            )
            insert_jobs(c, run_id, list(zip(job_ids, jobs, strict=True)), now)
        return CreatedRun(run_id, name, job_ids, now)

    def by_name(self, name: str) -> RunRow:
        row = self.db.row(f"SELECT {_COLUMNS} FROM runs WHERE name = ?", [name])
        if row is None:
            raise NotFound(f"run {name!r} does not exist (see `dstack ps -a`)")
        return RunRow.of(row)

    def by_name_with_tags(self, name: str) -> tuple[RunRow, list[str]]:
        """The run and the names of its tags, in one statement (GetRun: a call per run of every waiting client).
        The tags in the order `Tags.of_runs` gives them (its index on run_id, then insertion)."""
        row = self.db.row(
            f"SELECT {_COLUMNS}, (SELECT json_group_array(t.name) FROM tags t WHERE t.run_id = runs.id) AS tag_names"
            " FROM runs WHERE name = ?",
            [name],
        )
        if row is None:
            raise NotFound(f"run {name!r} does not exist (see `dstack ps -a`)")
        return RunRow.of(row), json_list(row["tag_names"])

    def by_id(self, run_id: str) -> RunRow:
        row = self.db.row(f"SELECT {_COLUMNS} FROM runs WHERE id = ?", [run_id])
        if row is None:
            raise NotFound(f"run {run_id!r} does not exist")
        return RunRow.of(row)

    def queued_jobs_of(self, owner: str) -> int:
        """How many of the owner's jobs wait to start (submitted or pending): found through the owner's
        unfinished runs (index runs(owner, status)) and their jobs (index jobs(run_id)), never a scan."""
        row = self.db.row(
            f"SELECT COUNT(*) AS n FROM jobs WHERE status IN ({ints_in(WAITING)}) AND run_id IN"
            f" (SELECT id FROM runs WHERE owner = ? AND status NOT IN ({ints_in(TERMINAL_RUN)}))",
            [owner],
        )
        return int(row["n"]) if row is not None else 0

    def recent(self, include_all: bool, limit: int) -> list[RunRow]:
        """The unfinished runs then the most recent finished ones (with `include_all`, every run)."""
        if include_all:
            rows = self.db.rows(f"SELECT {_COLUMNS} FROM runs ORDER BY submitted_at DESC LIMIT ?", [limit])
            return [RunRow.of(r) for r in rows]
        finished = ints_in(TERMINAL_RUN)
        active = self.db.rows(
            f"SELECT {_COLUMNS} FROM runs WHERE status NOT IN ({finished}) ORDER BY submitted_at DESC LIMIT ?",
            [limit],
        )
        recent = self.db.rows(
            f"SELECT {_COLUMNS} FROM runs WHERE status IN ({finished}) ORDER BY submitted_at DESC LIMIT ?",
            [max(0, min(10, limit - len(active)))],
        )
        return sorted((RunRow.of(r) for r in active + recent), key=lambda r: -r.submitted_at)

    def listing_page(self, include_all: bool, limit: int, token: str, with_finished: bool = False) -> RunsPage:
        """One page of the listing `recent` gives, with no cap: every run (newest first) with
        `include_all`, else every unfinished run (newest first) and then the RECENT_FINISHED most
        recent finished ones. `token`: where the previous page stopped ("" for the first).
        `with_finished` (not `include_all`): a page of unfinished runs that stops before the finished
        ones also carries them in `finished`, read with the page (one call, one snapshot, for `dstack ps`)."""
        phase, position = _parse_page_token(token, "all" if include_all else "active")
        if phase == "finished":
            return RunsPage(self._latest_finished(), "")
        where = "1" if phase == "all" else f"status NOT IN ({ints_in(TERMINAL_RUN)})"
        rows = self._ordered(where, position, limit + 1)
        extra = self._latest_finished() if with_finished and phase == "active" else []
        if len(rows) > limit:
            last = rows[limit - 1]
            return RunsPage(rows[:limit], f"{phase}:{last.submitted_at}:{last.id}", extra)
        if phase == "active":  # the finished ones come after the last unfinished one
            if len(rows) + RECENT_FINISHED > limit:
                return RunsPage(rows, "finished::", extra)
            return RunsPage(rows + (extra if with_finished else self._latest_finished()), "")
        return RunsPage(rows, "")

    def _latest_finished(self) -> list[RunRow]:
        return self._ordered(f"status IN ({ints_in(TERMINAL_RUN)})", None, RECENT_FINISHED)

    def _ordered(self, where: str, after: tuple[int, str] | None, limit: int) -> list[RunRow]:
        params: list[object] = []
        if after is not None:
            where += " AND (submitted_at < ? OR (submitted_at = ? AND id < ?))"
            params += [after[0], after[0], after[1]]
        rows = self.db.rows(
            f"SELECT {_COLUMNS} FROM runs WHERE {where} ORDER BY submitted_at DESC, id DESC LIMIT ?", [*params, limit]
        )
        return [RunRow.of(r) for r in rows]

    def page(self, filters: RunFilters, limit: int, before: tuple[int, str] | None) -> list[RunRow]:
        """Up to `limit` runs matching `filters`, newest first, strictly after the cursor `before`
        (the (submitted_at, id) of the last run of the previous page): paging never skips or repeats
        a run, however many are submitted meanwhile."""
        where: list[str] = []
        params: list[object] = []
        for column, values in (("owner", filters.owners), ("workflow", filters.workflows)):
            if values:
                where.append(f"{column} IN ({', '.join('?' * len(values))})")
                params.extend(values)
        if filters.statuses:
            where.append(f"status IN ({ints_in(filters.statuses)})")
        if filters.repository:
            where.append("repository = ?")
            params.append(filters.repository)
        if before is not None:
            where.append("(submitted_at, id) < (?, ?)")
            params.extend(before)
        sql = f"SELECT {_COLUMNS} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self.db.rows(sql + " ORDER BY submitted_at DESC, id DESC LIMIT ?", [*params, limit])
        return [RunRow.of(r) for r in rows]

    def counts_by_status(self) -> dict[RunStatus, int]:
        rows = self.db.rows("SELECT status, COUNT(*) AS n FROM runs GROUP BY status")
        return {RunStatus(r["status"]): r["n"] for r in rows}

    def request_stop(self, run_name: str) -> list[StopOnAgent]:
        """Marks the run's unfinished jobs to stop. Jobs not yet on an agent stop at once; returns
        the jobs an agent must stop."""
        run = self.by_name(run_name)
        with self.db.tx() as c:
            now = self.db.clock()
            lifecycle.move_jobs(
                c,
                lifecycle.STOP_WAITING,
                "run_id = :run",
                {"run": run.id},
                message="stopped by user",
                at=now,
                also="stop_requested = 1",
            )
            # A user's stop wins over a preemption or max_duration asked before: the job ends stopped.
            on_agent = [
                StopOnAgent(wire_job_id(r[0], r[2]), r[1])
                for r in c.execute(
                    "UPDATE jobs SET stop_requested = 1, stop_reason = 0, stop_message = ''"
                    f" WHERE run_id = ? AND status IN ({ints_in(ON_AGENT)}) RETURNING id, agent_id, attempt",
                    [run.id],
                ).fetchall()
            ]
            lifecycle.refresh_run_status(c, run.id, now)
        return on_agent

    def latest_done(self, repository: str, workflow: str) -> RunRow:
        """The run of `workflow` in `repository` that finished done last."""
        row = self.db.row(
            f"SELECT {_COLUMNS} FROM runs WHERE repository = ? AND workflow = ? AND status = ?"
            " ORDER BY finished_at DESC LIMIT 1",
            [repository, workflow, int(RunStatus.DONE)],
        )
        if row is None:
            raise NotFound(
                f"no run of workflow {workflow!r} has finished done in repository {repository} yet: run it first"
            )
        return RunRow.of(row)

    def latest_done_ref(self, repository: str, ref: str) -> RunRow:
        """The run a workflow dependency names from a run of `repository`: the last done run of `WORKFLOW`
        there (else, for a folder without a remote, in `legacy`: protos/repos.py `reads_legacy`), or of
        `OWNER/REPO/WORKFLOW` there."""
        try:
            parsed = split_ref(ref)
        except BadRef as e:
            raise InvalidRequest(str(e)) from None
        if parsed.repository:
            return self.latest_done(resolve_qualifier(parsed.repository, self.repositories()), parsed.name)
        try:
            return self.latest_done(repository, parsed.name)
        except NotFound:
            if not reads_legacy(repository):
                raise
            try:
                return self.latest_done(LEGACY, parsed.name)
            except NotFound:
                pass
            raise

    def repositories(self) -> list[str]:
        """Every repository with a run (index runs(repository, ...): one step per repository)."""
        return [r["repository"] for r in self.db.rows("SELECT DISTINCT repository FROM runs ORDER BY repository")]

    # ---- deletion and retention ----------------------------------------------------------------
    def deletable(self, run_name: str) -> RunRow:
        run = self.by_name(run_name)
        unfinished_upload = run.kind == "upload" and run.finished_at is None
        if run.finished_at is None and not unfinished_upload:
            raise Conflict(f"run {run_name!r} has not finished: stop it first (`dstack stop {run_name}`)")
        # An unfinished job that takes this run's artifacts as an input (a tag's run, or one a rerun with
        # --same-inputs pinned: app/rerun.py) still needs them.
        taker = self.db.row(_INPUT_OF_UNFINISHED.replace("r.id", "?"), [run.id])
        if taker is not None:
            raise Conflict(
                f"run {run_name!r} is an input of run {taker['name']}, which has not finished: remove it after that"
            )
        tags = [r["name"] for r in self.db.rows("SELECT name FROM tags WHERE run_id = ?", [run.id])]
        if tags:
            raise Conflict(
                f"run {run_name!r} is tagged {', '.join(tags)}: delete the tag first (`dstack tags delete {tags[0]}`)"
            )
        return run

    def delete(self, run_id: str) -> None:
        with self.db.tx() as c:
            c.execute("DELETE FROM log_chunks WHERE job_id IN (SELECT id FROM jobs WHERE run_id = ?)", [run_id])
            c.execute("DELETE FROM artifacts WHERE job_id IN (SELECT id FROM jobs WHERE run_id = ?)", [run_id])
            c.execute("DELETE FROM records WHERE run_id = ?", [run_id])  # the run's record (store/records.py)
            c.execute("DELETE FROM jobs WHERE run_id = ?", [run_id])
            c.execute("DELETE FROM runs WHERE id = ?", [run_id])

    def expired(self, finished_before: int) -> list[ExpiredRun]:
        """Finished runs past retention whose logs or (untagged) artifacts are still kept."""
        rows = self.db.rows(
            "SELECT r.id, r.name, r.artifacts_deleted, EXISTS(SELECT 1 FROM tags t WHERE t.run_id = r.id) AS tagged,"
            " EXISTS(SELECT 1 FROM jobs j WHERE j.run_id = r.id AND j.logs_state < 2) AS has_logs"
            " FROM runs r WHERE r.finished_at IS NOT NULL AND r.finished_at < ?"
            f" AND NOT EXISTS ({_INPUT_OF_UNFINISHED})",  # kept while a job still to run takes it
            [finished_before],
        )
        return [
            ExpiredRun(r["id"], r["name"], bool(r["artifacts_deleted"]), bool(r["tagged"]), bool(r["has_logs"]))
            for r in rows
        ]

    def mark_artifacts_deleted(self, run_id: str) -> None:
        with self.db.tx() as c:
            c.execute("DELETE FROM artifacts WHERE job_id IN (SELECT id FROM jobs WHERE run_id = ?)", [run_id])
            c.execute("UPDATE runs SET artifacts_deleted = 1 WHERE id = ?", [run_id])
            # The step cache never offers files that are gone (coordinator/cache.py).
            c.execute("UPDATE jobs SET cache_key = '' WHERE run_id = ?", [run_id])


def insert_jobs(c: sqlite3.Connection, run_id: str, jobs: list[tuple[str, NewJob]], now: int) -> None:
    """Jobs of a run, as submitted: a new run's, or those a provider program added to its run
    (coordinator/provided_jobs.py), in the caller's transaction."""
    c.executemany(
        "INSERT INTO jobs (id, run_id, job_name, spec, status, termination_reason, message,"
        " agent_id, gpu_indices, submitted_at, stop_requested, cpu, memory, gpu_count, depends_on, inputs,"
        " gang, node_rank, cache_base) VALUES (?, ?, ?, ?, ?, 0, '', NULL, '[]', ?, 0, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                job_id,
                run_id,
                j.job_name,
                j.spec,
                int(lifecycle.SUBMIT.dst),
                now,
                j.cpu,
                j.memory,
                j.gpu_count,
                json.dumps(j.depends_on),
                json.dumps(j.inputs),
                j.gang,
                j.node_rank,
                j.cache_base,
            )
            for job_id, j in jobs
        ],
    )
