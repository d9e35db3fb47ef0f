"""Agents: registration, the pool's names, leases, heartbeats, removal and approval.

Statuses move only through coordinator/lifecycle/agents.py. A name is unique among the rows in the
pool (a partial unique index, migration 6): 'registered' (not connected yet), 'pending' (approval),
'online' and 'lost'. A new agent may take the name of one that is not online; the old row is then
deleted, or retired while jobs still refer to it. A 'removed' row keeps its token's hash, so that its
agent is told why it is refused, but not its name.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dstack.coordinator import lifecycle
from dstack.coordinator.attempts import wire_job_id
from dstack.coordinator.errors import AlreadyExists, Conflict, NotFound
from dstack.coordinator.lifecycle import agents as al
from dstack.coordinator.model import ON_AGENT
from dstack.coordinator.store.base import Db, ints_in
from dstack.coordinator.store.jobs import end_agent_jobs, fail_agent_jobs
from dstack.coordinator.store.users import hash_token
from dstack.protos.v1 import common_pb2


@dataclass(frozen=True)
class AgentRow:
    id: str
    name: str
    status: str  # an AgentStatus value (retired rows are never listed)
    inventory: bytes  # a serialized dstack.v1.Inventory, kept opaque
    registered_at: int
    last_heartbeat: int
    lease_expires_at: int  # on the coordinator's monotonic clock (engine.lease_now), not wall time

    @classmethod
    def of(cls, r: sqlite3.Row) -> AgentRow:
        return cls(
            r["id"],
            r["name"],
            r["status"],
            r["inventory"] or b"",
            r["registered_at"] or 0,
            r["last_heartbeat"] or 0,
            r["lease_expires_at"] or 0,
        )


_COLUMNS = "id, name, status, inventory, registered_at, last_heartbeat, lease_expires_at"


def _hostname(inventory: bytes | None) -> str:
    inv = common_pb2.Inventory()
    inv.ParseFromString(inventory or b"")
    return inv.hostname


def _retire(c: sqlite3.Connection, agent_id: str) -> None:
    """The agent leaves the pool: its token stops working, its name is free. The row stays only
    while jobs refer to it (so that they still say where they ran)."""
    if c.execute("SELECT 1 FROM jobs WHERE agent_id = :id LIMIT 1", {"id": agent_id}).fetchone():
        al.move_agents(c, al.RETIRE, "id = :id", {"id": agent_id}, also="token_hash = NULL")
    else:
        c.execute("DELETE FROM agents WHERE id = :id", {"id": agent_id})


_POOL = al.sql_list(al.IN_POOL)
# Agents that may leave the pool once not heard from for long enough (timed by the engine): lost,
# registered but never connected, or removed, with no job on them. (Pending ones wait for an admin.)
_UNUSED = (
    "status IN ('lost', 'registered', 'removed') AND NOT EXISTS"
    f" (SELECT 1 FROM jobs j WHERE j.agent_id = a.id AND j.status IN ({ints_in(ON_AGENT)}))"
)


@dataclass(frozen=True)
class Removal:
    agent_id: str
    failed_jobs: list[str]  # its jobs that were on it, now failed


class Agents:
    def __init__(self, db: Db) -> None:
        self.db = db

    def register(
        self,
        name: str,
        token: str,
        inventory: bytes,
        *,
        pending: bool = False,
        enrol: Callable[[sqlite3.Connection], None] | None = None,
    ) -> str:
        """A new agent; `enrol` (the join token's use, store/join_tokens.py) runs in the same
        transaction, so that a refused name does not use the token up. `pending`: it waits for an
        admin's approval."""
        agent_id = uuid.uuid4().hex
        now = self.db.clock()
        created = al.REGISTER_PENDING if pending else al.REGISTER
        with self.db.tx() as c:
            holder = c.execute(
                f"SELECT id, status, inventory FROM agents WHERE name = :name AND status IN ({_POOL})", {"name": name}
            ).fetchone()
            if holder is not None:
                if holder[1] == "online":
                    host = _hostname(holder[2])
                    raise AlreadyExists(
                        f"an agent named {name} is already online{f' (host {host})' if host else ''};"
                        " choose another --name"
                    )
                _retire(c, holder[0])
            if enrol is not None:
                enrol(c)
            c.execute(
                "INSERT INTO agents (id, name, token_hash, status, inventory, registered_at, last_heartbeat,"
                " lease_expires_at) VALUES (:id, :name, :hash, :status, :inventory, :now, :now, 0)",
                {
                    "id": agent_id,
                    "name": name,
                    "hash": hash_token(token),
                    "status": created.dst.value,
                    "inventory": inventory,
                    "now": now,
                },
            )
        return agent_id

    def unused(self) -> list[tuple[str, int]]:
        """(id, last heard from as a wall stamp) of agents that may be forgotten once not heard from
        for long enough (timed by the engine on the monotonic clock): lost, registered but never
        connected, or removed, with no job on them. (Pending ones wait for an admin.)"""
        rows = self.db.rows(f"SELECT id, last_heartbeat FROM agents a WHERE {_UNUSED}")
        return [(r["id"], r["last_heartbeat"] or 0) for r in rows]

    def forget(self, agent_ids: Sequence[str]) -> list[str]:
        """These agents leave the pool if they are still unused (as `unused` says); returns those that did."""
        gone = []
        with self.db.tx() as c:
            for agent_id in agent_ids:
                still = c.execute(f"SELECT 1 FROM agents a WHERE id = ? AND {_UNUSED}", [agent_id]).fetchone()
                if still is not None:
                    _retire(c, agent_id)
                    gone.append(agent_id)
        return gone

    def by_token(self, token: str) -> AgentRow | None:
        row = self.db.row(f"SELECT {_COLUMNS} FROM agents WHERE token_hash = ?", [hash_token(token)])
        return None if row is None else AgentRow.of(row)

    def online(self, agent_id: str, inventory: bytes, lease_until: int) -> str:
        """The agent's hello: it is online, unless it waits for approval (then only its inventory is
        kept, for the admin to see) or was removed. Returns its status after the hello."""
        params = {"inventory": inventory, "now": self.db.clock(), "lease": lease_until, "id": agent_id}
        with self.db.tx() as c:
            if al.move_agents(
                c,
                al.CONNECT,
                "id = :id",
                params,
                also="inventory = :inventory, last_heartbeat = :now, lease_expires_at = :lease",
            ):
                return al.AgentStatus.ONLINE.value
            c.execute(
                "UPDATE agents SET inventory = :inventory, last_heartbeat = :now WHERE id = :id AND status = 'pending'",
                params,
            )
            row = c.execute("SELECT status FROM agents WHERE id = :id", params).fetchone()
        return al.AgentStatus.RETIRED.value if row is None else str(row[0])

    def heartbeat(self, agent_id: str, inventory: bytes | None, lease_until: int) -> None:
        with self.db.tx() as c:
            if inventory is None:
                c.execute(
                    "UPDATE agents SET last_heartbeat = ?, lease_expires_at = ? WHERE id = ? AND status = 'online'",
                    [self.db.clock(), lease_until, agent_id],
                )
            else:
                c.execute(
                    "UPDATE agents SET last_heartbeat = ?, lease_expires_at = ?, inventory = ? WHERE id = ?"
                    " AND status = 'online'",
                    [self.db.clock(), lease_until, inventory, agent_id],
                )

    def record_heard(self, heard: dict[str, int]) -> None:
        """When each agent was last heard from (wall ns), written in one batch (coordinator/leases.py keeps
        leases in memory; this is what `dstack agents` and forgetting lost agents read)."""
        with self.db.tx() as c:
            c.executemany(
                "UPDATE agents SET last_heartbeat = ? WHERE id = ? AND status = 'online'",
                [(at, agent_id) for agent_id, at in heard.items()],
            )

    def online_ids(self) -> list[str]:
        return [r[0] for r in self.db.conn.execute("SELECT id FROM agents WHERE status = 'online'")]

    def lose(
        self,
        agent_ids: Sequence[str],
        still_expired: Callable[[str], bool],
        at: int,
        requeued: list[str] | None = None,
    ) -> list[str]:
        """Marks these agents lost if they are still online and `still_expired` says their lease (kept in
        memory) is still over as this runs, and fails their jobs or requeues them as new attempts (into
        `requeued`, if given), stamped with the wall time `at`; returns those marked lost."""
        lost = []
        with self.db.tx() as c:
            for agent_id in agent_ids:
                if not still_expired(agent_id):
                    continue
                if c.execute("SELECT 1 FROM agents WHERE id = ? AND status = 'online'", [agent_id]).fetchone() is None:
                    continue
                again = end_agent_jobs(c, agent_id, lifecycle.AGENT_LOST, "agent lost", at)
                if requeued is not None:
                    requeued += again
                al.move_agents(c, al.LOSE, "id = :id", {"id": agent_id})
                lost.append(agent_id)
        return lost

    def extend_all_leases(self, lease_until: int) -> None:
        """At start-up: agents could not renew while the coordinator was down, that is not their fault."""
        with self.db.tx() as c:
            c.execute("UPDATE agents SET lease_expires_at = ? WHERE status = 'online'", [lease_until])

    def expire_leases(self, now: int, at: int | None = None) -> list[str]:
        """Marks agents whose lease ran out by `now` (the engine's monotonic lease clock) as lost, and
        fails their jobs or requeues them as new attempts (their `retry` lists agent-lost), stamped with
        the wall time `at` (default: the store's clock); returns the lost agents' ids."""
        at = self.db.clock() if at is None else at
        with self.db.tx() as c:
            lost = [
                r[0] for r in c.execute("SELECT id FROM agents WHERE status = 'online' AND lease_expires_at < ?", [now])
            ]
            for agent_id in lost:
                end_agent_jobs(c, agent_id, lifecycle.AGENT_LOST, "agent lost", at)
                al.move_agents(c, al.LOSE, "id = :id", {"id": agent_id})
        return lost

    def online_agents(self) -> list[AgentRow]:
        return [AgentRow.of(r) for r in self.db.rows(f"SELECT {_COLUMNS} FROM agents WHERE status = 'online'")]

    def online_agent_keys(self) -> list[tuple[str, str, bytes | None]]:
        """Every online agent's id, name and inventory (what a scheduling pass uses of its row), as the
        database's own tuples: the engine's reread compares them with the last ones and reads the rows
        (`online_agents`) only if they differ. A record per row was most of the cost of a reread of
        5,000 agents' rows (25 of 35 ms)."""
        return self.db.conn.execute("SELECT id, name, inventory FROM agents WHERE status = 'online'").fetchall()

    def pool(self) -> list[AgentRow]:
        """Every agent that registered and was not retired, by name (`dstack agents`): online, lost,
        never connected, pending approval and removed."""
        rows = self.db.rows(f"SELECT {_COLUMNS} FROM agents WHERE status != 'retired' ORDER BY name, registered_at")
        return [AgentRow.of(r) for r in rows]

    def _in_pool(self, c: sqlite3.Connection, name: str) -> tuple[str, str]:
        row = c.execute(
            f"SELECT id, status FROM agents WHERE name = :n AND status IN ({_POOL})", {"n": name}
        ).fetchone()
        if row is None:
            removed = c.execute("SELECT 1 FROM agents WHERE name = :n AND status = 'removed'", {"n": name}).fetchone()
            raise NotFound(f"agent {name} was already removed" if removed else f"no agent named {name} in the pool")
        return str(row[0]), str(row[1])

    def remove(self, name: str) -> Removal:
        """An admin removes the agent: its credential is refused from now on, its name is free, and
        the jobs on it fail (their dependants and runs follow)."""
        now = self.db.clock()
        with self.db.tx() as c:
            agent_id, _ = self._in_pool(c, name)
            on_it = [
                wire_job_id(r[0], r[1])
                for r in c.execute(
                    f"SELECT id, attempt FROM jobs WHERE agent_id = :a AND status IN ({ints_in(ON_AGENT)})",
                    {"a": agent_id},
                )
            ]
            fail_agent_jobs(c, agent_id, lifecycle.AGENT_REMOVED, f"agent {name} was removed by an admin", now)
            # Its heartbeat time is when it was removed: `--forget-lost-agents-after` counts from there.
            al.move_agents(c, al.REMOVE, "id = :id", {"id": agent_id, "now": now}, also="last_heartbeat = :now")
        return Removal(agent_id, on_it)

    def approve(self, name: str, connected: Callable[[str], bool], lease_until: int) -> str:
        """An admin approves a pending agent: online at once if it is connected, else when it
        connects. Returns its id."""
        with self.db.tx() as c:
            agent_id, status = self._in_pool(c, name)
            if status != al.AgentStatus.PENDING:
                raise Conflict(f"agent {name} is not waiting for approval (it is {al.label(status)})")
            if connected(agent_id):
                al.move_agents(
                    c,
                    al.APPROVE_CONNECTED,
                    "id = :id",
                    {"id": agent_id, "lease": lease_until, "now": self.db.clock()},
                    also="lease_expires_at = :lease, last_heartbeat = :now",
                )
            else:
                al.move_agents(c, al.APPROVE, "id = :id", {"id": agent_id})
        return agent_id
