"""What an agent may touch: the queries behind coordinator/app/agent_scope.py, each one indexed
statement (jobs by primary key, or by the (agent_id, status) index).

An agent acts on a job while the job is assigned to it and may still act (`ON_AGENT`: assigned,
pulling, running, uploading); once the job is finished, failed as lost or moved elsewhere, nothing
of it is the agent's any more.
"""

from __future__ import annotations

from collections.abc import Sequence

from dstack.coordinator.attempts import parse_wire_job_id
from dstack.coordinator.model import ON_AGENT, TERMINAL_JOB, JobStatus, TerminationReason
from dstack.coordinator.store.base import Db, ints_in, marks
from dstack.coordinator.store.jobs import JobLocation

ACTING_ROWS_BATCH = 500  # job ids per statement (SQLite's bound on variables)
_ACTING = f"j.agent_id = ? AND j.status IN ({ints_in(ON_AGENT)})"


class Scope:
    def __init__(self, db: Db) -> None:
        self.db = db

    def acting_job(self, agent_id: str, wire_id: str) -> JobLocation | None:
        """The job, if the agent may act on it now: the attempt it names (coordinator/attempts.py) is
        the job's current one, on this agent, in a status that still acts."""
        job_id, attempt = parse_wire_job_id(wire_id)
        r = self.db.row(
            "SELECT j.id, j.run_id, j.job_name, j.agent_id, j.status, j.attempt, r.name AS run_name FROM jobs j"
            f" JOIN runs r ON r.id = j.run_id WHERE j.id = ? AND j.attempt = ? AND {_ACTING}",
            [job_id, attempt, agent_id],
        )
        if r is None:
            return None
        return JobLocation(
            r["id"], r["run_id"], r["run_name"], r["job_name"], r["agent_id"], JobStatus(r["status"]), r["attempt"]
        )

    def reportable(self, agent_id: str, wire_ids: Sequence[str]) -> tuple[set[str], set[str]]:
        """Of the attempts an agent's stream message names, (current, ended): those that are the
        agent's acting attempt of their job (lines and updates), and those the agent ran and that
        ended while their job goes on (a preempted attempt's last lines go into that attempt's own
        range of seqs; its updates change nothing). An attempt that ended because its agent was lost
        is neither: its late lines and updates are refused."""
        if not wire_ids:
            return set(), set()
        named = {w: parse_wire_job_id(w) for w in set(wire_ids)}
        ids = sorted({job for job, _ in named.values()})
        rows = self.db.rows(
            f"SELECT j.id, j.attempt, 1 AS current FROM jobs j WHERE j.id IN ({marks(ids)}) AND {_ACTING}"
            " UNION ALL SELECT a.job_id, a.attempt, 0 FROM job_attempts a JOIN jobs j ON j.id = a.job_id"
            f" WHERE a.job_id IN ({marks(ids)}) AND a.agent_id = ? AND j.status NOT IN ({ints_in(TERMINAL_JOB)})"
            # An attempt fenced off because its agent was lost is closed: what the agent says of it
            # now comes from a process the coordinator already gave up on (coordinator/fencing.py).
            " AND a.termination_reason != ?",
            [*ids, agent_id, *ids, agent_id, int(TerminationReason.AGENT_LOST)],
        )
        current = {(r["id"], r["attempt"]) for r in rows if r["current"]}
        ended = {(r["id"], r["attempt"]) for r in rows if not r["current"]}
        return {w for w, p in named.items() if p in current}, {w for w, p in named.items() if p in ended}

    def acting_of_many(self, messages: Sequence[tuple[str, Sequence[str]]]) -> list[set[str]]:
        """`reportable`'s first set (the agent's acting attempts) for each of many messages (agent id, the
        attempts it names), in one statement for all of them rather than one per message: the report batch
        (coordinator/reports.py) screens its messages' updates in its own store call, not in a trip of
        each message's own to the DB thread."""
        named = [[(w, parse_wire_job_id(w)) for w in wire_ids] for _, wire_ids in messages]
        ids = sorted({job for pairs in named for _, (job, _) in pairs})
        holder: dict[str, tuple[str, int]] = {}  # job id -> (agent, attempt) of its acting attempt
        for i in range(0, len(ids), ACTING_ROWS_BATCH):
            chunk = ids[i : i + ACTING_ROWS_BATCH]
            for job_id, agent_id, attempt in self.db.conn.execute(
                f"SELECT id, agent_id, attempt FROM jobs WHERE id IN ({marks(chunk)})"
                f" AND status IN ({ints_in(ON_AGENT)})",
                chunk,
            ):
                holder[job_id] = (agent_id, attempt)
        return [
            {w for w, (job, attempt) in pairs if holder.get(job) == (agent_id, attempt)}
            for (agent_id, _), pairs in zip(messages, named, strict=True)
        ]

    def lost_attempts(self, agent_id: str, wire_ids: Sequence[str]) -> set[str]:
        """Of the attempts named, those the agent ran that were ended because it was lost (the job
        failed, or went on as a new attempt): the coordinator gave up on them without the agent's word
        that their processes ended, so they may still hold the agent's GPUs (coordinator/fencing.py)."""
        if not wire_ids:
            return set()
        named = {w: parse_wire_job_id(w) for w in set(wire_ids)}
        ids = sorted({job for job, _ in named.values()})
        lost = int(TerminationReason.AGENT_LOST)
        rows = self.db.rows(
            f"SELECT id, attempt FROM jobs WHERE id IN ({marks(ids)}) AND agent_id = ? AND termination_reason = ?"
            f" UNION ALL SELECT job_id, attempt FROM job_attempts WHERE job_id IN ({marks(ids)}) AND agent_id = ?"
            " AND termination_reason = ?",
            [*ids, agent_id, lost, *ids, agent_id, lost],
        )
        found = {(r["id"], r["attempt"]) for r in rows}
        return {w for w, p in named.items() if p in found}

    def has_code(self, agent_id: str, code_hash: str) -> bool:
        """Whether one of the agent's acting jobs runs this code."""
        row = self.db.row(
            f"SELECT 1 FROM jobs j JOIN runs r ON r.id = j.run_id WHERE {_ACTING} AND r.code_hash = ? LIMIT 1",
            [agent_id, code_hash],
        )
        return row is not None

    def input_sources(self, agent_id: str) -> set[tuple[str, str]]:
        """(run name, job name) of every job whose artifacts one of the agent's acting jobs takes as
        inputs: the jobs it depends on in its run, every job of the runs it takes (tags and workflow
        dependencies), as `store.artifacts.inputs_of` resolves them into the assignment, and for a
        later attempt its own job (the checkpoint of `lifecycle.attempts.resume_inputs`)."""
        rows = self.db.rows(
            "SELECT r.name AS run_name, d.value AS job_name FROM jobs j JOIN runs r ON r.id = j.run_id,"
            f" json_each(j.depends_on) d WHERE {_ACTING}"
            " UNION SELECT r.name, s.job_name FROM jobs j, json_each(j.inputs) i"
            f" JOIN runs r ON r.id = i.value JOIN jobs s ON s.run_id = r.id WHERE {_ACTING}"
            " UNION SELECT r.name, j.job_name FROM jobs j JOIN runs r ON r.id = j.run_id"
            f" WHERE {_ACTING} AND j.attempt > 1",
            [agent_id, agent_id, agent_id],
        )
        return {(r["run_name"], r["job_name"]) for r in rows}
