"""All reads and writes of the coordinator's SQLite database.

The store is blocking by design: the coordinator calls it from one dedicated thread
(`coordinator.store.executor.DbExecutor`), never from the event loop.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils

from dstack.coordinator.errors import AlreadyExists, Conflict, InvalidRequest, NotFound
from dstack.coordinator.names import random_run_prefix
from dstack.coordinator.store.schema import migrate
from dstack.protos.v1 import agent_pb2, common_pb2

JS = common_pb2.JobStatus
TR = common_pb2.TerminationReason

TERMINAL = (JS.JOB_STATUS_DONE, JS.JOB_STATUS_FAILED, JS.JOB_STATUS_STOPPED)
ON_AGENT = (JS.JOB_STATUS_ASSIGNED, JS.JOB_STATUS_PULLING, JS.JOB_STATUS_RUNNING, JS.JOB_STATUS_UPLOADING)
WAITING = (JS.JOB_STATUS_SUBMITTED, JS.JOB_STATUS_PENDING)
# Agents report PULLING, RUNNING, UPLOADING and terminal states; a status may only move forward.
_RANK = {
    JS.JOB_STATUS_SUBMITTED: 1,
    JS.JOB_STATUS_PENDING: 2,
    JS.JOB_STATUS_ASSIGNED: 3,
    JS.JOB_STATUS_PULLING: 4,
    JS.JOB_STATUS_RUNNING: 5,
    JS.JOB_STATUS_UPLOADING: 6,
    JS.JOB_STATUS_DONE: 7,
    JS.JOB_STATUS_FAILED: 7,
    JS.JOB_STATUS_STOPPED: 7,
}

Row = dict[str, Any]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _hostname(inventory: bytes | None) -> str:
    inv = common_pb2.Inventory()
    inv.ParseFromString(inventory or b"")
    return inv.hostname


def _in(values: Sequence[Any]) -> str:
    return ",".join(str(int(v)) for v in values)


@dataclass
class NewJob:
    job_name: str
    spec: bytes
    cpu: float
    memory: int
    gpu_count: int
    depends_on: list[str]
    inputs: list[str] = field(default_factory=list)  # ids of runs whose artifacts the job takes


@dataclass
class CreatedRun:
    run_id: str
    name: str
    job_ids: list[str]  # in the order the jobs were given
    submitted_at: int


@dataclass
class Placement:
    job_id: str
    agent_id: str
    gpu_indices: list[int]


@dataclass
class Assignment:
    """A placed job, with what the agent needs to run it."""

    job_id: str
    agent_id: str
    run_name: str
    spec: bytes
    code: bytes
    gpu_indices: list[int]
    inputs: list[agent_pb2.ArtifactInput] = field(default_factory=list)


@dataclass
class UpdateResult:
    acks: list[agent_pb2.UpdateAck] = field(default_factory=list)
    changed_runs: set[str] = field(default_factory=set)  # run ids whose status may have changed
    freed: bool = False  # capacity was released: the scheduler should look again


class Store:
    def __init__(self, path: Path, clock: Callable[[], int] = time.time_ns) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a power loss may drop the last commits, never corrupt the file.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        self.db = sqlite_utils.Database(conn)
        self.conn = conn
        self.clock = clock
        self.in_batch = False
        migrate(self.db)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A transaction; inside a group-commit batch (DbExecutor) the batch's transaction is used."""
        if self.in_batch:
            yield self.conn
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _rows(self, sql: str, params: dict[str, Any] | Sequence[Any] = ()) -> list[Row]:
        cur = self.conn.execute(sql, params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def _row(self, sql: str, params: dict[str, Any] | Sequence[Any] = ()) -> Row | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    # ---- users -------------------------------------------------------------------------------
    def ensure_user(self, name: str, token: str, role: str) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO users (name, token_hash, role, created_at) VALUES (:n, :h, :r, :t)"
                " ON CONFLICT(name) DO UPDATE SET token_hash = :h, role = :r",
                {"n": name, "h": hash_token(token), "r": role, "t": self.clock()},
            )

    def user_for_token(self, token: str) -> str | None:
        row = self._row("SELECT name FROM users WHERE token_hash = ?", [hash_token(token)])
        return None if row is None else str(row["name"])

    # ---- code --------------------------------------------------------------------------------
    def has_code(self, code_hash: str) -> bool:
        return self._row("SELECT 1 AS x FROM code WHERE hash = ?", [code_hash]) is not None

    def add_code(self, code_hash: str, size: int) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO code (hash, size, created_at) VALUES (?, ?, ?)",
                [code_hash, size, self.clock()],
            )

    # ---- runs --------------------------------------------------------------------------------
    def reserve_run_name(self) -> str:
        """A new readable name (adjective-animal-N); never handed out twice."""
        prefix = random_run_prefix()
        with self.tx() as c:
            n = c.execute(
                "INSERT INTO run_name_counters (prefix, n) VALUES (?, 1)"
                " ON CONFLICT(prefix) DO UPDATE SET n = n + 1 RETURNING n",
                [prefix],
            ).fetchone()[0]
        return f"{prefix}-{n}"

    def create_run(
        self,
        owner: str,
        workflow: str,
        code: bytes,
        code_hash: str,
        args: list[str],
        jobs: list[NewJob],
        name: str | None = None,
        tag_on_done: str = "",
    ) -> CreatedRun:
        """Inserts a run and its jobs in one transaction (under `name`, or a new one)."""
        now = self.clock()
        run_id = uuid.uuid4().hex
        job_ids = [uuid.uuid4().hex for _ in jobs]
        name = name or self.reserve_run_name()
        with self.tx() as c:
            c.execute(
                "INSERT INTO runs (id, name, owner, workflow, status, termination_reason, message,"
                " submitted_at, code_hash, code, args, queue, priority, tag_on_done) VALUES (:id, :name, :owner,"
                " :wf, :st, 0, '', :now, :ch, :code, :args, '', 0, :tag)",
                {
                    "id": run_id,
                    "name": name,
                    "owner": owner,
                    "wf": workflow,
                    "st": common_pb2.RUN_STATUS_SUBMITTED,
                    "now": now,
                    "ch": code_hash,
                    "code": code,
                    "args": json.dumps(args),
                    "tag": tag_on_done or None,
                },
            )
            c.executemany(
                "INSERT INTO jobs (id, run_id, job_name, spec, status, termination_reason, message,"
                " agent_id, gpu_indices, submitted_at, stop_requested, cpu, memory, gpu_count, depends_on, inputs)"
                " VALUES (?, ?, ?, ?, ?, 0, '', NULL, '[]', ?, 0, ?, ?, ?, ?, ?)",
                [
                    (
                        job_id,
                        run_id,
                        j.job_name,
                        j.spec,
                        JS.JOB_STATUS_SUBMITTED,
                        now,
                        j.cpu,
                        j.memory,
                        j.gpu_count,
                        json.dumps(j.depends_on),
                        json.dumps(j.inputs),
                    )
                    for job_id, j in zip(job_ids, jobs, strict=True)
                ],
            )
        return CreatedRun(run_id, name, job_ids, now)

    def run_by_name(self, name: str) -> Row:
        row = self._row("SELECT * FROM runs WHERE name = ?", [name])
        if row is None:
            raise NotFound(f"run {name!r} does not exist (see `dstack ps -a`)")
        return row

    def run_by_id(self, run_id: str) -> Row:
        row = self._row("SELECT * FROM runs WHERE id = ?", [run_id])
        if row is None:
            raise NotFound(f"run {run_id!r} does not exist")
        return row

    def jobs_of_runs(self, run_ids: Sequence[str]) -> dict[str, list[Row]]:
        out: dict[str, list[Row]] = {r: [] for r in run_ids}
        if not run_ids:
            return out
        marks = ",".join("?" for _ in run_ids)
        rows = self._rows(
            "SELECT j.*, a.name AS agent_name FROM jobs j LEFT JOIN agents a ON a.id = j.agent_id"
            f" WHERE j.run_id IN ({marks}) ORDER BY j.submitted_at, j.rowid",
            list(run_ids),
        )
        for r in rows:
            out[r["run_id"]].append(r)
        return out

    def tags_of_runs(self, run_ids: Sequence[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {r: [] for r in run_ids}
        if not run_ids:
            return out
        marks = ",".join("?" for _ in run_ids)
        for r in self._rows(f"SELECT name, run_id FROM tags WHERE run_id IN ({marks})", list(run_ids)):
            out[r["run_id"]].append(r["name"])
        return out

    def list_runs(self, include_all: bool, limit: int) -> list[Row]:
        if include_all:
            return self._rows("SELECT * FROM runs ORDER BY submitted_at DESC LIMIT ?", [limit])
        finished = (common_pb2.RUN_STATUS_DONE, common_pb2.RUN_STATUS_FAILED, common_pb2.RUN_STATUS_STOPPED)
        # Unfinished runs, then the most recent finished ones.
        active = self._rows(
            f"SELECT * FROM runs WHERE status NOT IN ({_in(finished)}) ORDER BY submitted_at DESC LIMIT ?",
            [limit],
        )
        recent = self._rows(
            f"SELECT * FROM runs WHERE status IN ({_in(finished)}) ORDER BY submitted_at DESC LIMIT ?",
            [max(0, min(10, limit - len(active)))],
        )
        return sorted(active + recent, key=lambda r: -int(r["submitted_at"]))

    def refresh_run_status(self, c: sqlite3.Connection, run_id: str) -> None:
        """Derives a run's status from its jobs (docs/lifecycle.md)."""
        statuses = [
            (r[0], r[1], r[2], r[3])
            for r in c.execute(
                "SELECT status, termination_reason, message, job_name FROM jobs WHERE run_id = ? ORDER BY finished_at",
                [run_id],
            )
        ]
        s = {st for st, _, _, _ in statuses}
        reason, message, finished_at = 0, "", None
        if s <= set(TERMINAL):
            finished_at = self.clock()
            failed = [x for x in statuses if x[0] == JS.JOB_STATUS_FAILED]
            stopped = [x for x in statuses if x[0] == JS.JOB_STATUS_STOPPED]
            if failed:
                status, reason, message = common_pb2.RUN_STATUS_FAILED, failed[0][1], failed[0][2]
                if len(statuses) > 1:
                    message = f"{failed[0][3]}: {message}"
            elif stopped:
                status, reason, message = common_pb2.RUN_STATUS_STOPPED, stopped[0][1], stopped[0][2]
            else:
                status, reason = common_pb2.RUN_STATUS_DONE, TR.TERMINATION_REASON_DONE
        elif JS.JOB_STATUS_PULLING in s and JS.JOB_STATUS_RUNNING not in s:
            status = common_pb2.RUN_STATUS_PULLING
        elif JS.JOB_STATUS_RUNNING in s or JS.JOB_STATUS_ASSIGNED in s:
            status = common_pb2.RUN_STATUS_RUNNING
        elif JS.JOB_STATUS_UPLOADING in s:
            status = common_pb2.RUN_STATUS_UPLOADING
        elif JS.JOB_STATUS_PENDING in s:
            status = common_pb2.RUN_STATUS_PENDING
        else:
            status = common_pb2.RUN_STATUS_SUBMITTED
        cur = c.execute(
            "UPDATE runs SET status = :s, termination_reason = :r, message = :m,"
            " finished_at = COALESCE(finished_at, :f) WHERE id = :id AND status != :s RETURNING tag_on_done",
            {"s": status, "r": reason, "m": message, "f": finished_at, "id": run_id},
        )
        row = cur.fetchone()
        if row is not None and row[0] and status == common_pb2.RUN_STATUS_DONE:  # `dstack run -t TAG`
            c.execute(
                "INSERT INTO tags (name, run_id, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET run_id = excluded.run_id, created_at = excluded.created_at",
                [row[0], run_id, self.clock()],
            )

    def request_stop(self, run_name: str) -> list[tuple[str, str]]:
        """Marks the run's unfinished jobs to stop. Jobs not yet on an agent stop at once; returns
        (job_id, agent_id) of jobs an agent must stop."""
        run = self.run_by_name(run_name)
        with self.tx() as c:
            now = self.clock()
            c.execute(
                f"UPDATE jobs SET status = {JS.JOB_STATUS_STOPPED}, stop_requested = 1, finished_at = ?,"
                f" termination_reason = {TR.TERMINATION_REASON_STOPPED_BY_USER}, message = 'stopped by user'"
                f" WHERE run_id = ? AND status IN ({_in(WAITING)})",
                [now, run["id"]],
            )
            on_agent = [
                (r[0], r[1])
                for r in c.execute(
                    f"SELECT id, agent_id FROM jobs WHERE run_id = ? AND status IN ({_in(ON_AGENT)})",
                    [run["id"]],
                )
            ]
            c.execute(
                f"UPDATE jobs SET stop_requested = 1 WHERE run_id = ? AND status IN ({_in(ON_AGENT)})",
                [run["id"]],
            )
            self.refresh_run_status(c, run["id"])
        return on_agent

    # ---- scheduling --------------------------------------------------------------------------
    def waiting_jobs(self) -> list[Row]:
        return self._rows(
            "SELECT j.id, j.run_id, j.status, j.spec, j.depends_on, r.owner, r.priority"
            " FROM jobs j JOIN runs r ON r.id = j.run_id"
            f" WHERE j.status IN ({_in(WAITING)}) ORDER BY r.priority DESC, j.submitted_at, j.rowid"
        )

    def dependency_statuses(self, run_ids: Sequence[str]) -> dict[tuple[str, str], int]:
        """(run_id, job_name) -> status, and (run_id, "#" + job_id) -> status, for the jobs of runs."""
        if not run_ids:
            return {}
        marks = ",".join("?" for _ in run_ids)
        out: dict[tuple[str, str], int] = {}
        sql = f"SELECT id, run_id, job_name, status FROM jobs WHERE run_id IN ({marks})"
        for r in self._rows(sql, list(run_ids)):
            out[(r["run_id"], r["job_name"])] = out[(r["run_id"], "#" + r["id"])] = int(r["status"])
        return out

    def online_agents(self) -> list[Row]:
        return self._rows("SELECT id, name, inventory FROM agents WHERE status = 'online'")

    def active_allocations(self) -> list[Row]:
        return self._rows(f"SELECT agent_id, cpu, memory, gpu_indices FROM jobs WHERE status IN ({_in(ON_AGENT)})")

    def apply_schedule(
        self,
        placements: list[Placement],
        waiting: Collection[str],
        failures: Sequence[tuple[str, int, str]],
    ) -> list[Assignment]:
        """Records a scheduler pass: placed jobs become ASSIGNED, waiting ones PENDING, impossible ones
        FAILED. Why a job waits changes with every pass, so it is kept in memory, not written here."""
        if not placements and not waiting and not failures:
            return []
        now = self.clock()
        touched: set[str] = set()
        out: list[Assignment] = []
        with self.tx() as c:
            for p in placements:
                cur = c.execute(
                    f"UPDATE jobs SET status = {JS.JOB_STATUS_ASSIGNED}, agent_id = ?, gpu_indices = ?,"
                    f" message = '' WHERE id = ? AND status IN ({_in(WAITING)})"
                    " RETURNING run_id, spec",
                    [p.agent_id, json.dumps(p.gpu_indices), p.job_id],
                )
                row = cur.fetchone()
                if row is None:
                    continue  # stopped meanwhile
                run_id, spec = row
                touched.add(run_id)
                name, code = c.execute("SELECT name, code FROM runs WHERE id = ?", [run_id]).fetchone()
                out.append(Assignment(p.job_id, p.agent_id, name, spec, code, p.gpu_indices, self._inputs(c, p.job_id)))
            for job_id in waiting:
                cur = c.execute(
                    f"UPDATE jobs SET status = {JS.JOB_STATUS_PENDING} WHERE id = ?"
                    f" AND status = {JS.JOB_STATUS_SUBMITTED} RETURNING run_id",
                    [job_id],
                )
                for (run_id,) in cur.fetchall():
                    touched.add(run_id)
            for job_id, term_reason, message in failures:
                cur = c.execute(
                    f"UPDATE jobs SET status = {JS.JOB_STATUS_FAILED}, termination_reason = ?, message = ?,"
                    f" finished_at = ? WHERE id = ? AND status IN ({_in(WAITING)}) RETURNING run_id",
                    [term_reason, message, now, job_id],
                )
                for (run_id,) in cur.fetchall():
                    touched.add(run_id)
                    self._fail_dependants(c, run_id)
            for run_id in touched:
                self.refresh_run_status(c, run_id)
        return out

    def _inputs(self, c: sqlite3.Connection, job_id: str) -> list[agent_pb2.ArtifactInput]:
        """The artifacts a job starts with: of the jobs it depends on in its run, and of the runs it
        takes as inputs (tag and workflow dependencies), in that order."""
        run_id, depends_on, inputs = c.execute(
            "SELECT run_id, depends_on, inputs FROM jobs WHERE id = ?", [job_id]
        ).fetchone()
        sources: list[tuple[str, str]] = [(run_id, n) for n in json.loads(depends_on or "[]")]
        for source_run in json.loads(inputs or "[]"):
            sources += [
                (source_run, r[0]) for r in c.execute("SELECT job_name FROM jobs WHERE run_id = ?", [source_run])
            ]
        out = []
        for source_run, job_name in sources:
            rows = c.execute(
                "SELECT r.name, a.path, a.size, a.sha256 FROM jobs j JOIN runs r ON r.id = j.run_id"
                " JOIN artifacts a ON a.job_id = j.id WHERE j.run_id = ? AND j.job_name = ? ORDER BY a.path",
                [source_run, job_name],
            ).fetchall()
            if rows:
                out.append(
                    agent_pb2.ArtifactInput(
                        run_name=rows[0][0],
                        job_name=job_name,
                        files=[
                            common_pb2.ArtifactFile(job_name=job_name, path=p, size=s, sha256=h) for _, p, s, h in rows
                        ],
                    )
                )
        return out

    def assignments_for_agent(self, agent_id: str, job_ids: Sequence[str]) -> list[Assignment]:
        if not job_ids:
            return []
        marks = ",".join("?" for _ in job_ids)
        rows = self._rows(
            "SELECT j.id, j.spec, j.gpu_indices, r.name, r.code FROM jobs j JOIN runs r ON r.id = j.run_id"
            f" WHERE j.id IN ({marks}) AND j.agent_id = ?",
            [*job_ids, agent_id],
        )
        return [
            Assignment(
                r["id"],
                agent_id,
                r["name"],
                r["spec"],
                r["code"],
                json.loads(r["gpu_indices"]),
                self._inputs(self.conn, r["id"]),
            )
            for r in rows
        ]

    # ---- agents ------------------------------------------------------------------------------
    # A name is unique among the rows that are not 'retired' (a partial unique index, migration 5):
    # 'registered' (not connected yet), 'online' and 'lost'. A new agent may take the name of one
    # that is not online; the old row is then deleted, or retired while jobs still refer to it.
    def register_agent(self, name: str, token: str, inventory: bytes) -> str:
        agent_id = uuid.uuid4().hex
        now = self.clock()
        with self.tx() as c:
            holder = c.execute(
                "SELECT id, status, inventory FROM agents WHERE name = :name AND status != 'retired'", {"name": name}
            ).fetchone()
            if holder is not None:
                if holder[1] == "online":
                    host = _hostname(holder[2])
                    raise AlreadyExists(
                        f"an agent named {name} is already online{f' (host {host})' if host else ''};"
                        " choose another --name"
                    )
                self._retire(c, holder[0])
            c.execute(
                "INSERT INTO agents (id, name, token_hash, status, inventory, registered_at, last_heartbeat,"
                " lease_expires_at) VALUES (:id, :name, :hash, 'registered', :inventory, :now, :now, 0)",
                {"id": agent_id, "name": name, "hash": hash_token(token), "inventory": inventory, "now": now},
            )
        return agent_id

    def _retire(self, c: sqlite3.Connection, agent_id: str) -> None:
        """The agent leaves the pool: its token stops working, its name is free. The row stays only
        while jobs refer to it (so that they still say where they ran)."""
        if c.execute("SELECT 1 FROM jobs WHERE agent_id = :id LIMIT 1", {"id": agent_id}).fetchone():
            c.execute("UPDATE agents SET status = 'retired', token_hash = NULL WHERE id = :id", {"id": agent_id})
        else:
            c.execute("DELETE FROM agents WHERE id = :id", {"id": agent_id})

    def forget_lost_agents(self, not_seen_since: int) -> list[str]:
        """Agents lost (or registered but never connected) and not heard from since then, with no job
        on them, leave the pool; returns their ids."""
        with self.tx() as c:
            gone = [
                r[0]
                for r in c.execute(
                    "SELECT id FROM agents a WHERE status IN ('lost', 'registered') AND last_heartbeat < :before"
                    " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.agent_id = a.id"
                    f" AND j.status IN ({_in(ON_AGENT)}))",
                    {"before": not_seen_since},
                )
            ]
            for agent_id in gone:
                self._retire(c, agent_id)
        return gone

    def agent_by_token(self, token: str) -> Row | None:
        return self._row("SELECT id, name, status FROM agents WHERE token_hash = ?", [hash_token(token)])

    def agent_online(self, agent_id: str, inventory: bytes, lease_until: int) -> None:
        with self.tx() as c:
            c.execute(
                "UPDATE agents SET status = 'online', inventory = :inventory, last_heartbeat = :now,"
                " lease_expires_at = :lease WHERE id = :id AND status != 'retired'",
                {"inventory": inventory, "now": self.clock(), "lease": lease_until, "id": agent_id},
            )

    def heartbeat(self, agent_id: str, inventory: bytes | None, lease_until: int) -> None:
        with self.tx() as c:
            if inventory is None:
                c.execute(
                    "UPDATE agents SET last_heartbeat = ?, lease_expires_at = ? WHERE id = ? AND status = 'online'",
                    [self.clock(), lease_until, agent_id],
                )
            else:
                c.execute(
                    "UPDATE agents SET last_heartbeat = ?, lease_expires_at = ?, inventory = ? WHERE id = ?"
                    " AND status = 'online'",
                    [self.clock(), lease_until, inventory, agent_id],
                )

    def extend_all_leases(self, lease_until: int) -> None:
        """At start-up: agents could not renew while the coordinator was down, that is not their fault."""
        with self.tx() as c:
            c.execute("UPDATE agents SET lease_expires_at = ? WHERE status = 'online'", [lease_until])

    def expire_leases(self, now: int) -> list[str]:
        """Marks agents whose lease ran out as lost and fails their jobs; returns the lost agents' ids."""
        with self.tx() as c:
            lost = [
                r[0] for r in c.execute("SELECT id FROM agents WHERE status = 'online' AND lease_expires_at < ?", [now])
            ]
            for agent_id in lost:
                self._fail_agent_jobs(c, agent_id, TR.TERMINATION_REASON_AGENT_LOST, "agent lost", now)
                c.execute("UPDATE agents SET status = 'lost' WHERE id = ?", [agent_id])
        return lost

    def _fail_agent_jobs(
        self, c: sqlite3.Connection, agent_id: str, reason: int, message: str, now: int, job_ids: Any = None
    ) -> None:
        sql = (
            f"UPDATE jobs SET status = {JS.JOB_STATUS_FAILED}, termination_reason = ?, message = ?,"
            f" finished_at = ? WHERE agent_id = ? AND status IN ({_in(ON_AGENT)})"
        )
        params: list[Any] = [reason, message, now, agent_id]
        if job_ids is not None:
            sql += f" AND id IN ({','.join('?' for _ in job_ids)})"
            params += list(job_ids)
        sql += " RETURNING run_id"
        for run_id in {r[0] for r in c.execute(sql, params).fetchall()}:
            self._fail_dependants(c, run_id)
            self.refresh_run_status(c, run_id)

    def fail_jobs_lost_by_agent(self, agent_id: str, job_ids: Sequence[str]) -> None:
        if job_ids:
            with self.tx() as c:
                self._fail_agent_jobs(
                    c,
                    agent_id,
                    TR.TERMINATION_REASON_EXECUTOR_ERROR,
                    "the agent restarted and no longer has this job",
                    self.clock(),
                    job_ids,
                )

    def stop_unstarted(self, job_ids: Sequence[str]) -> None:
        if not job_ids:
            return
        with self.tx() as c:
            marks = ",".join("?" for _ in job_ids)
            cur = c.execute(
                f"UPDATE jobs SET status = {JS.JOB_STATUS_STOPPED}, finished_at = ?,"
                f" termination_reason = {TR.TERMINATION_REASON_STOPPED_BY_USER}, message = 'stopped by user'"
                f" WHERE id IN ({marks}) AND status = {JS.JOB_STATUS_ASSIGNED} RETURNING run_id",
                [self.clock(), *job_ids],
            )
            for run_id in {r[0] for r in cur.fetchall()}:
                self._fail_dependants(c, run_id)
                self.refresh_run_status(c, run_id)

    def jobs_on_agent(self, agent_id: str) -> list[Row]:
        return self._rows(
            f"SELECT id, status, stop_requested FROM jobs WHERE agent_id = ? AND status IN ({_in(ON_AGENT)})",
            [agent_id],
        )

    def terminal_or_unknown(self, agent_id: str, job_ids: Sequence[str]) -> list[str]:
        """Of the jobs an agent says it runs, those it should not be running any more."""
        if not job_ids:
            return []
        marks = ",".join("?" for _ in job_ids)
        live = {
            r["id"]
            for r in self._rows(
                f"SELECT id FROM jobs WHERE id IN ({marks}) AND agent_id = ? AND status IN ({_in(ON_AGENT)})",
                [*job_ids, agent_id],
            )
        }
        return [j for j in job_ids if j not in live]

    def list_agents(self) -> list[Row]:
        return self._rows("SELECT * FROM agents WHERE status IN ('online', 'lost') ORDER BY name")

    # ---- job updates from agents -------------------------------------------------------------
    def apply_job_updates(self, agent_id: str, updates: Sequence[agent_pb2.JobUpdate]) -> UpdateResult:
        res = UpdateResult()
        with self.tx() as c:
            for u in updates:
                res.acks.append(agent_pb2.UpdateAck(job_id=u.job_id, status=u.status))
                row = c.execute(
                    "SELECT status, run_id, stop_requested FROM jobs WHERE id = ? AND agent_id = ?",
                    [u.job_id, agent_id],
                ).fetchone()
                if row is None:
                    continue
                status, run_id, stop_requested = row
                if _RANK.get(u.status, 0) <= _RANK[status] or status in TERMINAL:
                    continue  # stale or repeated update
                reason, message = u.termination_reason, u.message
                if stop_requested and u.status in (JS.JOB_STATUS_FAILED, JS.JOB_STATUS_STOPPED):
                    status_new = JS.JOB_STATUS_STOPPED
                    reason, message = TR.TERMINATION_REASON_STOPPED_BY_USER, "stopped by user"
                else:
                    status_new = u.status
                params = {
                    "s": status_new,
                    "r": reason,
                    "m": message,
                    "t": u.time_ns or self.clock(),
                    "e": u.exit_code if u.has_exit_code else None,
                    "id": u.job_id,
                }
                if status_new == JS.JOB_STATUS_PULLING:
                    c.execute("UPDATE jobs SET status = :s WHERE id = :id", params)
                elif status_new == JS.JOB_STATUS_RUNNING:
                    c.execute("UPDATE jobs SET status = :s, started_at = :t WHERE id = :id", params)
                elif status_new == JS.JOB_STATUS_UPLOADING:
                    c.execute(
                        "UPDATE jobs SET status = :s, exit_code = :e, started_at = COALESCE(started_at, :t)"
                        " WHERE id = :id",
                        params,
                    )
                else:
                    res.freed = True
                    c.execute(
                        "UPDATE jobs SET status = :s, termination_reason = :r, message = :m, finished_at = :t,"
                        " exit_code = COALESCE(:e, exit_code) WHERE id = :id",
                        params,
                    )
                    if status_new != JS.JOB_STATUS_DONE:
                        self._fail_dependants(c, run_id)
                res.changed_runs.add(run_id)
            for run_id in res.changed_runs:  # once per run, however many of its jobs changed
                self.refresh_run_status(c, run_id)
        return res

    def _fail_dependants(self, c: sqlite3.Connection, run_id: str) -> None:
        """Jobs waiting on a job that did not finish done can never start."""
        while True:
            rows = c.execute("SELECT id, job_name, status, depends_on FROM jobs WHERE run_id = ?", [run_id]).fetchall()
            bad = {r[1] for r in rows if r[2] in (JS.JOB_STATUS_FAILED, JS.JOB_STATUS_STOPPED)}
            victims = [
                (r[0], next(d for d in json.loads(r[3]) if d in bad))
                for r in rows
                if r[2] in WAITING and bad.intersection(json.loads(r[3]))
            ]
            if not victims:
                return
            for job_id, dep in victims:
                c.execute(
                    f"UPDATE jobs SET status = {JS.JOB_STATUS_FAILED}, termination_reason = ?, message = ?,"
                    " finished_at = ? WHERE id = ?",
                    [
                        TR.TERMINATION_REASON_DEPENDENCY_FAILED,
                        f"dependency {dep!r} failed",
                        self.clock(),
                        job_id,
                    ],
                )

    # ---- logs --------------------------------------------------------------------------------
    def insert_logs(self, batches: Sequence[agent_pb2.LogBatch]) -> list[agent_pb2.LogAck]:
        acks = []
        with self.tx() as c:
            for b in batches:
                if not b.lines:
                    continue
                c.executemany(
                    "INSERT OR IGNORE INTO logs (job_id, seq, stream, time_ns, text) VALUES (?, ?, ?, ?, ?)",
                    [(b.job_id, ln.seq, ln.stream, ln.time_ns, ln.text) for ln in b.lines],
                )
                acks.append(agent_pb2.LogAck(job_id=b.job_id, seq=b.lines[-1].seq))
        return acks

    def log_positions(self, job_ids: Sequence[str]) -> dict[str, int]:
        return {
            j: int(self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM logs WHERE job_id = ?", [j]).fetchone()[0])
            for j in job_ids
        }

    def read_logs(self, job_id: str, after_seq: int, limit: int, max_bytes: int = 4 << 20) -> list[common_pb2.LogLine]:
        """Lines after `after_seq`, at most `limit` of them and about `max_bytes` (at least one)."""
        cur = self.conn.execute(
            "SELECT seq, stream, time_ns, text FROM logs WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            [job_id, after_seq, limit],
        )
        out: list[common_pb2.LogLine] = []
        for r in cur:
            max_bytes -= len(r[3]) + 32
            if out and max_bytes < 0:
                break
            out.append(common_pb2.LogLine(seq=r[0], stream=r[1], time_ns=r[2], text=r[3]))
        return out

    def run_ids_of_jobs(self, job_ids: Sequence[str]) -> dict[str, str]:
        marks = ",".join("?" for _ in job_ids)
        return {
            r["id"]: r["run_id"]
            for r in self._rows(f"SELECT id, run_id FROM jobs WHERE id IN ({marks})", list(job_ids))
        }

    # ---- artifacts ---------------------------------------------------------------------------
    def job_location(self, job_id: str) -> Row:
        row = self._row(
            "SELECT j.id, j.run_id, j.job_name, j.agent_id, j.status, r.name AS run_name FROM jobs j"
            " JOIN runs r ON r.id = j.run_id WHERE j.id = ?",
            [job_id],
        )
        if row is None:
            raise NotFound(f"job {job_id!r} does not exist")
        return row

    def save_artifacts(self, job_id: str, files: Sequence[tuple[str, int, str]]) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM artifacts WHERE job_id = ?", [job_id])
            c.executemany(
                "INSERT INTO artifacts (job_id, path, size, sha256) VALUES (?, ?, ?, ?)",
                [(job_id, p, s, h) for p, s, h in files],
            )

    def list_artifacts(self, run_id: str) -> list[Row]:
        return self._rows(
            "SELECT j.job_name, a.path, a.size, a.sha256 FROM artifacts a JOIN jobs j ON j.id = a.job_id"
            " WHERE j.run_id = ? ORDER BY j.job_name, a.path",
            [run_id],
        )

    def artifact(self, run_id: str, job_name: str, path: str) -> Row:
        row = self._row(
            "SELECT a.job_id, a.path, a.size, a.sha256 FROM artifacts a JOIN jobs j ON j.id = a.job_id"
            " WHERE j.run_id = ? AND j.job_name = ? AND a.path = ?",
            [run_id, job_name, path],
        )
        if row is None:
            raise NotFound(f"artifact {path!r} of job {job_name!r} does not exist")
        return row

    # ---- uploaded artifact sets (`dstack artifacts upload`) -------------------------------------
    def create_upload_run(self, owner: str, workflow: str, tag: str) -> tuple[str, str, str]:
        """A run with one job, already uploading (never queued); returns run id, name and job id."""
        if self._row("SELECT 1 FROM tags WHERE name = ?", [tag]):
            raise Conflict(f"tag {tag!r} already exists: delete it first (`dstack tags delete {tag}`)")
        name = self.reserve_run_name()
        now = self.clock()
        run_id, job_id = uuid.uuid4().hex, uuid.uuid4().hex
        spec = common_pb2.JobSpec(job_name=workflow, provider="upload").SerializeToString()
        with self.tx() as c:
            c.execute(
                "INSERT INTO runs (id, name, owner, workflow, status, termination_reason, message, submitted_at,"
                " code_hash, code, args, queue, priority, tag_on_done, kind) VALUES (?, ?, ?, ?, ?, 0, '', ?, '',"
                " ?, '[]', '', 0, ?, 'upload')",
                [run_id, name, owner, workflow, common_pb2.RUN_STATUS_RUNNING, now, b"", tag],
            )
            c.execute(
                "INSERT INTO jobs (id, run_id, job_name, spec, status, termination_reason, message, agent_id,"
                " gpu_indices, submitted_at, started_at, stop_requested, cpu, memory, gpu_count, depends_on, inputs)"
                " VALUES (?, ?, ?, ?, ?, 0, '', NULL, '[]', ?, ?, 0, 0, 0, 0, '[]', '[]')",
                [job_id, run_id, workflow, spec, JS.JOB_STATUS_UPLOADING, now, now],
            )
        return run_id, name, job_id

    def upload_job(self, run_name: str) -> Row:
        run = self.run_by_name(run_name)
        job = self._row("SELECT id, job_name, status FROM jobs WHERE run_id = ?", [run["id"]])
        if run["kind"] != "upload" or job is None:
            raise InvalidRequest(f"run {run_name!r} is not an artifact upload")
        if job["status"] != JS.JOB_STATUS_UPLOADING:
            raise Conflict(f"the upload {run_name!r} is already finished")
        return {**job, "run_id": run["id"], "run_name": run_name, "tag": run["tag_on_done"]}

    def finish_upload_run(self, run_name: str, files: Sequence[tuple[str, int, str]]) -> None:
        """Records the files, marks the job (and so the run) done and sets the tag, in one transaction."""
        job = self.upload_job(run_name)
        now = self.clock()
        with self.tx() as c:
            c.execute("DELETE FROM artifacts WHERE job_id = ?", [job["id"]])
            c.executemany(
                "INSERT INTO artifacts (job_id, path, size, sha256) VALUES (?, ?, ?, ?)",
                [(job["id"], p, sz, h) for p, sz, h in files],
            )
            c.execute(
                "UPDATE jobs SET status = ?, termination_reason = ?, finished_at = ?, exit_code = 0 WHERE id = ?",
                [JS.JOB_STATUS_DONE, TR.TERMINATION_REASON_DONE, now, job["id"]],
            )
            self.refresh_run_status(c, job["run_id"])  # done: this also sets the run's tag_on_done

    # ---- deletion and retention ----------------------------------------------------------------
    def deletable_run(self, run_name: str) -> Row:
        run = self.run_by_name(run_name)
        unfinished_upload = run["kind"] == "upload" and run["finished_at"] is None
        if run["finished_at"] is None and not unfinished_upload:
            raise Conflict(f"run {run_name!r} has not finished: stop it first (`dstack stop {run_name}`)")
        tags = [r["name"] for r in self._rows("SELECT name FROM tags WHERE run_id = ?", [run["id"]])]
        if tags:
            raise Conflict(
                f"run {run_name!r} is tagged {', '.join(tags)}: delete the tag first (`dstack tags delete {tags[0]}`)"
            )
        return run

    def delete_run(self, run_id: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM logs WHERE job_id IN (SELECT id FROM jobs WHERE run_id = ?)", [run_id])
            c.execute("DELETE FROM artifacts WHERE job_id IN (SELECT id FROM jobs WHERE run_id = ?)", [run_id])
            c.execute("DELETE FROM jobs WHERE run_id = ?", [run_id])
            c.execute("DELETE FROM runs WHERE id = ?", [run_id])

    def jobs_to_archive(self, finished_before: int, limit: int) -> list[Row]:
        return self._rows(
            "SELECT j.id, j.job_name, r.name AS run_name FROM jobs j JOIN runs r ON r.id = j.run_id"
            f" WHERE j.logs_state = 0 AND j.status IN ({_in(TERMINAL)}) AND j.finished_at < ? LIMIT ?",
            [finished_before, limit],
        )

    def all_logs(self, job_id: str) -> list[tuple[int, int, int, str]]:
        return [
            (r[0], r[1], r[2], r[3])
            for r in self.conn.execute(
                "SELECT seq, stream, time_ns, text FROM logs WHERE job_id = ? ORDER BY seq", [job_id]
            )
        ]

    def mark_logs_archived(self, job_id: str) -> None:
        with self.tx() as c:
            c.execute("UPDATE jobs SET logs_state = 1 WHERE id = ?", [job_id])
            c.execute("DELETE FROM logs WHERE job_id = ?", [job_id])

    def expired_runs(self, finished_before: int) -> list[Row]:
        """Finished runs past retention whose logs or (untagged) artifacts are still kept."""
        return self._rows(
            "SELECT r.id, r.name, r.artifacts_deleted, EXISTS(SELECT 1 FROM tags t WHERE t.run_id = r.id) AS tagged,"
            " EXISTS(SELECT 1 FROM jobs j WHERE j.run_id = r.id AND j.logs_state < 2) AS has_logs"
            " FROM runs r WHERE r.finished_at IS NOT NULL AND r.finished_at < ?",
            [finished_before],
        )

    def mark_logs_deleted(self, run_id: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM logs WHERE job_id IN (SELECT id FROM jobs WHERE run_id = ?)", [run_id])
            c.execute("UPDATE jobs SET logs_state = 2 WHERE run_id = ?", [run_id])

    def mark_artifacts_deleted(self, run_id: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM artifacts WHERE job_id IN (SELECT id FROM jobs WHERE run_id = ?)", [run_id])
            c.execute("UPDATE runs SET artifacts_deleted = 1 WHERE id = ?", [run_id])

    # ---- tags --------------------------------------------------------------------------------
    def add_tag(self, tag: str, run_name: str) -> Row:
        run = self.run_by_name(run_name)
        if run["status"] != common_pb2.RUN_STATUS_DONE:
            state = "has not finished" if run["finished_at"] is None else "did not finish done"
            raise Conflict(f"run {run_name!r} {state}: only runs that finished done can be tagged")
        with self.tx() as c:
            if c.execute("SELECT 1 FROM tags WHERE name = ?", [tag]).fetchone():
                raise Conflict(f"tag {tag!r} already exists: delete it first (`dstack tags delete {tag}`)")
            c.execute("INSERT INTO tags (name, run_id, created_at) VALUES (?, ?, ?)", [tag, run["id"], self.clock()])
        return self.tag(tag)

    def tag(self, tag: str) -> Row:
        row = self._row(
            "SELECT t.name, t.created_at, r.id AS run_id, r.name AS run_name, r.workflow FROM tags t"
            " JOIN runs r ON r.id = t.run_id WHERE t.name = ?",
            [tag],
        )
        if row is None:
            raise NotFound(f"tag {tag!r} does not exist (see `dstack tags list`)")
        return row

    def list_tags(self) -> list[Row]:
        return self._rows(
            "SELECT t.name, t.created_at, r.name AS run_name, r.workflow FROM tags t"
            " JOIN runs r ON r.id = t.run_id ORDER BY t.name"
        )

    def delete_tag(self, tag: str) -> None:
        with self.tx() as c:
            if c.execute("DELETE FROM tags WHERE name = ? RETURNING name", [tag]).fetchone() is None:
                raise NotFound(f"tag {tag!r} does not exist (see `dstack tags list`)")

    def latest_done_run(self, workflow: str) -> Row:
        row = self._row(
            "SELECT id, name FROM runs WHERE workflow = ? AND status = ? ORDER BY finished_at DESC LIMIT 1",
            [workflow, common_pb2.RUN_STATUS_DONE],
        )
        if row is None:
            raise NotFound(f"no run of workflow {workflow!r} has finished done yet: run it first")
        return row

    # ---- secrets (values encrypted by coordinator.secrets) -----------------------------------
    def put_secret(self, name: str, ciphertext: bytes) -> Row:
        now = self.clock()
        with self.tx() as c:
            c.execute(
                "INSERT INTO secrets (name, ciphertext, created_at, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET ciphertext = excluded.ciphertext, updated_at = excluded.updated_at",
                [name, ciphertext, now, now],
            )
        row = self._row("SELECT name, created_at, updated_at FROM secrets WHERE name = ?", [name])
        assert row is not None
        return row

    def list_secrets(self) -> list[Row]:
        return self._rows("SELECT name, created_at, updated_at FROM secrets ORDER BY name")

    def secret_ciphertexts(self) -> list[tuple[str, bytes]]:
        return [(r["name"], r["ciphertext"]) for r in self._rows("SELECT name, ciphertext FROM secrets")]

    def delete_secret(self, name: str) -> None:
        with self.tx() as c:
            if c.execute("DELETE FROM secrets WHERE name = ? RETURNING name", [name]).fetchone() is None:
                raise NotFound(f"secret {name!r} does not exist (see `dstack secrets list`)")
