"""Fair-share usage: each user's decayed GPU-seconds of finished jobs (coordinator/fairshare.py), and
per-user shares and quotas.

Each finished job is counted once: a pass charges the jobs that finished since the last one (found
through a partial index, never a scan of every finished job) in the same transaction that marks them
counted and writes the users' accumulators, so a restart neither loses nor double-counts usage.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from dstack.coordinator.errors import NotFound
from dstack.coordinator.fairshare import Accumulator, interval_usage, weight
from dstack.coordinator.model import ON_AGENT, JobStatus
from dstack.coordinator.store.base import Db, ints_in, json_list, marks
from dstack.coordinator.store.base import rows as rows_of

NS = 1_000_000_000


@dataclass(frozen=True)
class FinishedJob:
    """A job just counted: what it ran (for the duration estimates) and for how long."""

    workflow: str
    job_name: str
    seconds: float
    done: bool = True  # finished done (only those say how long the workflow takes)


@dataclass(frozen=True)
class UserLimitsRow:
    name: str
    role: str
    share: float
    max_gpus: int
    max_running: int


@dataclass(frozen=True)
class OnAgent:
    """A job an agent holds, with what fair share, quotas and reservations need to know of it."""

    id: str
    agent_id: str
    owner: str
    workflow: str
    job_name: str
    cpu: float
    memory: int
    gpu_indices: list[int]
    started_at: int | None
    assigned_at: int  # its submission, for a job not started yet


# (id, agent_id, owner, workflow, job_name, cpu, memory, gpu_indices, started_at, submitted_at), as read
OnAgentRow = tuple[str, str, str, str, str, float | None, int | None, str | None, int | None, int]


def on_agent_of(r: OnAgentRow) -> OnAgent:
    """An OnAgent from a tuple of `Usage.on_agent_rows`."""
    return OnAgent(r[0], r[1], r[2], r[3], r[4], r[5] or 0.0, r[6] or 0, json_list(r[7]), r[8], r[9])


def on_agent_from_row(r: sqlite3.Row) -> OnAgent:
    """An OnAgent from a row of jobs joined with its run (id, agent_id, owner, workflow, job_name, cpu,
    memory, gpu_indices, started_at, submitted_at)."""
    return OnAgent(
        r["id"],
        r["agent_id"],
        r["owner"],
        r["workflow"],
        r["job_name"],
        r["cpu"] or 0.0,
        r["memory"] or 0,
        json_list(r["gpu_indices"]),
        r["started_at"],
        r["submitted_at"],
    )


class Usage:
    def __init__(self, db: Db, half_life_s: float = 86400.0) -> None:
        self.db = db
        self.half_life_s = half_life_s  # the coordinator sets its --fairshare-half-life
        self._acc: dict[str, Accumulator] | None = None
        self._finished: list[FinishedJob] = []  # charged by `charge_ended`, until the next pass takes them

    def accumulators(self) -> dict[str, Accumulator]:
        if self._acc is None:
            rows = self.db.rows('SELECT "user", value, as_of FROM usage')
            self._acc = {r["user"]: Accumulator(r["value"], r["as_of"]) for r in rows}
        return self._acc

    def charge_ended(self, c: sqlite3.Connection, job_ids: Sequence[str]) -> None:
        """Charges jobs that an agent just reported ended, in the transaction that ended them (which
        marked them counted). On the DB thread, like every store call."""
        now = self.db.clock()
        rows = rows_of(
            c,
            "SELECT j.job_name, j.status, j.started_at, j.finished_at, j.gpu_count, j.cpu, r.owner, r.workflow"
            f" FROM jobs j JOIN runs r ON r.id = j.run_id WHERE j.id IN ({marks(job_ids)})",
            list(job_ids),
        )
        self._write(c, self._add(rows, now, self.half_life_s), now)

    def take_finished(self) -> list[FinishedJob]:
        """The jobs charged since the last call (for the duration estimates)."""
        out, self._finished = self._finished, []
        return out

    def _add(self, rows: Sequence[sqlite3.Row], now_ns: int, half_life_s: float) -> set[str]:
        acc = self.accumulators()
        changed: set[str] = set()
        for r in rows:
            start, end = r["started_at"], r["finished_at"]
            if not start or end is None or end <= start:
                continue
            end = min(end, now_ns)
            amount = interval_usage(weight(r["gpu_count"] or 0, r["cpu"] or 0.0), start, end, now_ns, half_life_s)
            acc.setdefault(r["owner"], Accumulator(0.0, now_ns)).add(amount, now_ns, half_life_s)
            changed.add(r["owner"])
            seconds = (r["finished_at"] - start) / NS
            self._finished.append(FinishedJob(r["workflow"], r["job_name"], seconds, r["status"] == JobStatus.DONE))
        return changed

    def _write(self, c: sqlite3.Connection, users: set[str], now_ns: int) -> None:
        acc = self.accumulators()
        for user in users:
            c.execute(
                'INSERT INTO usage ("user", value, as_of) VALUES (?, ?, ?)'
                ' ON CONFLICT("user") DO UPDATE SET value = excluded.value, as_of = excluded.as_of',
                [user, acc[user].value, acc[user].as_of_ns],
            )

    def charge_finished(self, now_ns: int, half_life_s: float) -> list[FinishedJob]:
        """Adds the jobs that ended since the last call and are not counted yet (those that ended
        otherwise than by their agent's report: lost agents, stops, failures) to their owners' usage;
        returns every job charged since the last call, those of `charge_ended` included."""
        rows = self.db.rows(
            "SELECT j.id, j.job_name, j.status, j.started_at, j.finished_at, j.gpu_count, j.cpu, r.owner, r.workflow"
            " FROM jobs j INDEXED BY jobs_uncharged JOIN runs r ON r.id = j.run_id"
            " WHERE j.usage_charged = 0 AND j.finished_at IS NOT NULL LIMIT 5000"
        )
        # Attempts that ended in a requeue (retried, preempted): their own start and end.
        attempts = self.db.rows(
            "SELECT a.job_id, a.attempt, j.job_name, a.status, a.started_at, a.finished_at, j.gpu_count, j.cpu,"
            " r.owner, r.workflow FROM job_attempts a INDEXED BY attempts_uncharged"
            " JOIN jobs j ON j.id = a.job_id JOIN runs r ON r.id = j.run_id WHERE a.usage_charged = 0 LIMIT 5000"
        )
        if rows or attempts:
            changed = self._add(rows, now_ns, half_life_s) | self._add(attempts, now_ns, half_life_s)
            ids = [r["id"] for r in rows]
            with self.db.tx() as c:
                for i in range(0, len(ids), 500):
                    chunk = ids[i : i + 500]
                    c.execute(f"UPDATE jobs SET usage_charged = 1 WHERE id IN ({marks(chunk)})", chunk)
                c.executemany(
                    "UPDATE job_attempts SET usage_charged = 1 WHERE job_id = ? AND attempt = ?",
                    [(a["job_id"], a["attempt"]) for a in attempts],
                )
                self._write(c, changed, now_ns)
        return self.take_finished()

    def recent_durations(self, limit: int = 2000) -> list[FinishedJob]:
        """The last finished jobs' durations, newest first (seeds the estimates at start-up)."""
        rows = self.db.rows(
            "SELECT j.job_name, j.started_at, j.finished_at, r.workflow FROM jobs j JOIN runs r ON r.id = j.run_id"
            f" WHERE j.finished_at IS NOT NULL AND j.started_at IS NOT NULL AND j.status = {int(JobStatus.DONE)}"
            " ORDER BY j.finished_at DESC LIMIT ?",
            [limit],
        )
        return [FinishedJob(r["workflow"], r["job_name"], (r["finished_at"] - r["started_at"]) / NS) for r in rows]

    def on_agent_rows(self) -> list[OnAgentRow]:
        """Every job on an agent as the database's own tuples (the engine's reread, every REREAD_S:
        thousands of rows at 5,000 agents): the engine compares them with what it read last time and
        makes records only of those that differ. A sqlite3.Row, a lookup by name per column and a frozen
        record per row were most of the reread's cost."""
        cur = self.db.conn.execute(
            "SELECT j.id, j.agent_id, r.owner, r.workflow, j.job_name, j.cpu, j.memory, j.gpu_indices,"
            " j.started_at, j.submitted_at"
            f" FROM jobs j JOIN runs r ON r.id = j.run_id WHERE j.status IN ({ints_in(ON_AGENT)})"
        )
        return cur.fetchall()

    def on_agents(self) -> list[OnAgent]:
        return [on_agent_of(r) for r in self.on_agent_rows()]

    # ---- shares and quotas -------------------------------------------------------------------
    def limits(self) -> list[UserLimitsRow]:
        rows = self.db.rows("SELECT name, role, share, max_gpus, max_running FROM users")
        return [UserLimitsRow(r["name"], r["role"] or "", r["share"], r["max_gpus"], r["max_running"]) for r in rows]

    def role(self, name: str) -> str | None:
        row = self.db.row("SELECT role FROM users WHERE name = ?", [name])
        return None if row is None else str(row["role"] or "")

    def set_limits(
        self, name: str, share: float | None, max_gpus: int | None, max_running: int | None
    ) -> UserLimitsRow:
        sets, params = [], []
        for column, value in (("share", share), ("max_gpus", max_gpus), ("max_running", max_running)):
            if value is not None:
                sets.append(f"{column} = ?")
                params.append(value)
        with self.db.tx() as c:
            if sets:
                c.execute(f"UPDATE users SET {', '.join(sets)} WHERE name = ?", [*params, name])
            found = c.execute("SELECT name, role, share, max_gpus, max_running FROM users WHERE name = ?", [name])
            row = found.fetchone()
        if row is None:
            raise NotFound(f"no user {name!r}")
        return UserLimitsRow(row[0], row[1] or "", row[2], row[3], row[4])
