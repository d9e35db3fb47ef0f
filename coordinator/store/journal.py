"""Which jobs changed since the scheduler last looked: a journal the writer connection keeps itself.

A scheduling pass starts from what running jobs hold (coordinator/holdings.py) and, over a deep queue,
from the statuses within runs whose waiting jobs have dependencies. Both used to be read again whole:
every running job after any job ended (thousands of rows per pass at scale, with jobs ending all the
time), and one status query per run with dependants at the queue's head per pass. Now TEMP triggers on
the writer connection note each job whose status, agent, start or resources change (and each job
inserted or deleted), with its run; a pass reads and empties the journal and rereads only those jobs.

Triggers see every write, whichever code path made it (an agent's report, a lease expiry, a stop, a
gang's sweep, a requeue): nothing has to remember to say so. A journal entry is written in the
transaction of the change it notes, so a rolled-back change leaves none. The journal lives in the
connection (TEMP): a connection opened again has none, and `drain` then says so (None) and sets it up
again, and the caller reads everything. Agents' rows (online, name, inventory) are noted the same way,
so a pass reads them again only when one changed.
"""

from __future__ import annotations

from dataclasses import dataclass

from dstack.coordinator.model import ON_AGENT, WAITING, JobStatus
from dstack.coordinator.store.base import Db, ints_in
from dstack.coordinator.store.usage import OnAgent, on_agent_from_row

_ON = ints_in(ON_AGENT)
_WAITING = ints_in(WAITING)

# `placed`: every change noted since the last drain was the scheduler's own placement (waiting ->
# assigned), which the engine has already added to what it holds.
_SETUP = (
    "CREATE TEMP TABLE IF NOT EXISTS job_changes (job_id TEXT PRIMARY KEY, run_id TEXT NOT NULL,"
    " placed INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TEMP TRIGGER IF NOT EXISTS job_changes_update"
    " AFTER UPDATE OF status, agent_id, gpu_indices, cpu, memory, started_at, run_id ON main.jobs"
    " BEGIN INSERT INTO job_changes VALUES"
    f" (new.id, new.run_id, old.status IN ({_WAITING}) AND new.status = {int(JobStatus.ASSIGNED)})"
    " ON CONFLICT(job_id) DO UPDATE SET placed = placed AND excluded.placed, run_id = excluded.run_id; END",
    "CREATE TEMP TRIGGER IF NOT EXISTS job_changes_insert AFTER INSERT ON main.jobs"
    " BEGIN INSERT INTO job_changes VALUES (new.id, new.run_id, 0)"
    " ON CONFLICT(job_id) DO UPDATE SET placed = 0; END",
    "CREATE TEMP TRIGGER IF NOT EXISTS job_changes_delete AFTER DELETE ON main.jobs"
    " BEGIN INSERT INTO job_changes VALUES (old.id, old.run_id, 0)"
    " ON CONFLICT(job_id) DO UPDATE SET placed = 0; END",
    # Agents whose row a pass reads changed (online or not, name, inventory); not a heartbeat's stamp.
    "CREATE TEMP TABLE IF NOT EXISTS agent_changes (agent_id TEXT PRIMARY KEY) WITHOUT ROWID",
    "CREATE TEMP TRIGGER IF NOT EXISTS agent_changes_update AFTER UPDATE OF status, name, inventory ON main.agents"
    " WHEN old.status IS NOT new.status OR old.name IS NOT new.name OR old.inventory IS NOT new.inventory"
    " BEGIN INSERT OR IGNORE INTO agent_changes VALUES (new.id); END",
    "CREATE TEMP TRIGGER IF NOT EXISTS agent_changes_insert AFTER INSERT ON main.agents"
    " BEGIN INSERT OR IGNORE INTO agent_changes VALUES (new.id); END",
    "CREATE TEMP TRIGGER IF NOT EXISTS agent_changes_delete AFTER DELETE ON main.agents"
    " BEGIN INSERT OR IGNORE INTO agent_changes VALUES (old.id); END",
)


@dataclass
class Changes:
    on_agents: list[OnAgent]  # changed jobs that are on an agent now (their rows as read now)
    off_agents: list[str]  # changed jobs that are on no agent now (ended, requeued, deleted, waiting)
    runs: set[str]  # the runs of every changed job, placements included (their statuses changed)
    agents: bool  # an agent's row changed: online or not, its name or its inventory


class JobJournal:
    def __init__(self, db: Db) -> None:
        self.db = db

    def start(self) -> None:
        """Sets the journal up on the writer connection (again, after a reopen), empty."""
        c = self.db.conn
        for sql in _SETUP:
            c.execute(sql)
        c.execute("DELETE FROM temp.job_changes")
        c.execute("DELETE FROM temp.agent_changes")

    def drain(self) -> Changes | None:
        """What changed since the last drain (or `start`), and empties the journal; None: there was no
        journal on this connection (it is set up now; the caller reads everything)."""
        with self.db.tx() as c:
            try:
                noted = c.execute("DELETE FROM temp.job_changes RETURNING job_id, run_id, placed").fetchall()
                agents = bool(c.execute("DELETE FROM temp.agent_changes RETURNING agent_id").fetchall())
            except Exception as e:
                if "no such table" not in str(e):
                    raise
                noted = None
        if noted is None:
            self.start()
            return None
        runs = {r[1] for r in noted}
        ids = [r[0] for r in noted if not r[2]]
        found: list[OnAgent] = []
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            rows = self.db.rows(
                "SELECT j.id, j.agent_id, j.job_name, j.cpu, j.memory, j.gpu_indices, j.started_at, j.submitted_at,"
                " r.owner, r.workflow FROM jobs j JOIN runs r ON r.id = j.run_id"
                f" WHERE j.id IN ({','.join('?' * len(chunk))}) AND j.status IN ({_ON})",
                chunk,
            )
            found += [on_agent_from_row(r) for r in rows]
        on = {j.id for j in found}
        return Changes(found, [j for j in ids if j not in on], runs, agents)
