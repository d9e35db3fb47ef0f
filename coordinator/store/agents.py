"""Agents: registration, the pool's names, leases and heartbeats.

A name is unique among the rows that are not 'retired' (a partial unique index, migration 5):
'registered' (not connected yet), 'online' and 'lost'. A new agent may take the name of one that is
not online; the old row is then deleted, or retired while jobs still refer to it.
"""

from __future__ import annotations

import sqlite3
import uuid
from dataclasses import dataclass

from dstack.coordinator import lifecycle
from dstack.coordinator.errors import AlreadyExists
from dstack.coordinator.model import ON_AGENT
from dstack.coordinator.store.base import Db, ints_in
from dstack.coordinator.store.jobs import fail_agent_jobs
from dstack.coordinator.store.users import hash_token
from dstack.protos.v1 import common_pb2


@dataclass(frozen=True)
class AgentRow:
    id: str
    name: str
    status: str  # registered, online, lost (retired rows are never listed)
    inventory: bytes  # a serialized dstack.v1.Inventory, kept opaque
    registered_at: int
    last_heartbeat: int
    lease_expires_at: int

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
        c.execute("UPDATE agents SET status = 'retired', token_hash = NULL WHERE id = :id", {"id": agent_id})
    else:
        c.execute("DELETE FROM agents WHERE id = :id", {"id": agent_id})


class Agents:
    def __init__(self, db: Db) -> None:
        self.db = db

    def register(self, name: str, token: str, inventory: bytes) -> str:
        agent_id = uuid.uuid4().hex
        now = self.db.clock()
        with self.db.tx() as c:
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
                _retire(c, holder[0])
            c.execute(
                "INSERT INTO agents (id, name, token_hash, status, inventory, registered_at, last_heartbeat,"
                " lease_expires_at) VALUES (:id, :name, :hash, 'registered', :inventory, :now, :now, 0)",
                {"id": agent_id, "name": name, "hash": hash_token(token), "inventory": inventory, "now": now},
            )
        return agent_id

    def forget_lost(self, not_seen_since: int) -> list[str]:
        """Agents lost (or registered but never connected) and not heard from since then, with no job
        on them, leave the pool; returns their ids."""
        with self.db.tx() as c:
            gone = [
                r[0]
                for r in c.execute(
                    "SELECT id FROM agents a WHERE status IN ('lost', 'registered') AND last_heartbeat < :before"
                    " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.agent_id = a.id"
                    f" AND j.status IN ({ints_in(ON_AGENT)}))",
                    {"before": not_seen_since},
                )
            ]
            for agent_id in gone:
                _retire(c, agent_id)
        return gone

    def by_token(self, token: str) -> AgentRow | None:
        row = self.db.row(f"SELECT {_COLUMNS} FROM agents WHERE token_hash = ?", [hash_token(token)])
        return None if row is None else AgentRow.of(row)

    def online(self, agent_id: str, inventory: bytes, lease_until: int) -> None:
        with self.db.tx() as c:
            c.execute(
                "UPDATE agents SET status = 'online', inventory = :inventory, last_heartbeat = :now,"
                " lease_expires_at = :lease WHERE id = :id AND status != 'retired'",
                {"inventory": inventory, "now": self.db.clock(), "lease": lease_until, "id": agent_id},
            )

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

    def extend_all_leases(self, lease_until: int) -> None:
        """At start-up: agents could not renew while the coordinator was down, that is not their fault."""
        with self.db.tx() as c:
            c.execute("UPDATE agents SET lease_expires_at = ? WHERE status = 'online'", [lease_until])

    def expire_leases(self, now: int) -> list[str]:
        """Marks agents whose lease ran out as lost and fails their jobs; returns the lost agents' ids."""
        with self.db.tx() as c:
            lost = [
                r[0] for r in c.execute("SELECT id FROM agents WHERE status = 'online' AND lease_expires_at < ?", [now])
            ]
            for agent_id in lost:
                fail_agent_jobs(c, agent_id, lifecycle.AGENT_LOST, "agent lost", now)
                c.execute("UPDATE agents SET status = 'lost' WHERE id = ?", [agent_id])
        return lost

    def online_agents(self) -> list[AgentRow]:
        return [AgentRow.of(r) for r in self.db.rows(f"SELECT {_COLUMNS} FROM agents WHERE status = 'online'")]

    def pool(self) -> list[AgentRow]:
        """Online and lost agents, by name (`dstack agents`)."""
        rows = self.db.rows(f"SELECT {_COLUMNS} FROM agents WHERE status IN ('online', 'lost') ORDER BY name")
        return [AgentRow.of(r) for r in rows]
