"""The agent pool: registration (a join token, checked by coordinator/auth.py and used up here),
listing, and an admin's removal and approval."""

from __future__ import annotations

import logging
import secrets
import sqlite3
from dataclasses import dataclass

from dstack.coordinator import stored
from dstack.coordinator.app.core import Core
from dstack.coordinator.convert import inventory_to_bytes
from dstack.coordinator.errors import AlreadyExists, Unauthenticated
from dstack.coordinator.lifecycle.agents import label
from dstack.coordinator.model import AgentView, Inventory
from dstack.coordinator.store.db import Store

log = logging.getLogger("dstack.coordinator")


@dataclass(frozen=True)
class Registration:
    agent_id: str
    agent_token: str


async def register(core: Core, name: str, inventory: Inventory, join_token_id: str) -> Registration:
    """A new agent (the caller showed a valid join token): its id and its own token. The join token's
    use is taken in the same transaction as the agent's row: of two agents racing for its last use,
    exactly one is enrolled, and a refused name does not use it up."""
    token = secrets.token_urlsafe(32)
    name = name or inventory.hostname or "agent"
    pending = core.engine.config.approve_agents

    def enrol(c: sqlite3.Connection) -> None:
        core.store.join_tokens.use(c, join_token_id, core.store.clock())

    try:
        agent_id = await core.db(
            core.store.register_agent, name, token, inventory_to_bytes(inventory), pending=pending, enrol=enrol
        )
    except (AlreadyExists, Unauthenticated) as e:
        log.warning("registration refused (host %s): %s", inventory.hostname or "?", e)
        raise
    log.info(
        "agent %s registered as %s with join token %s%s",
        name,
        agent_id,
        join_token_id,
        "; it waits for `dstack agents approve`" if pending else "",
    )
    return Registration(agent_id, token)


async def list_agents(core: Core) -> list[AgentView]:
    def load(store: Store) -> list[AgentView]:
        busy: dict[str, list[int]] = {}
        count: dict[str, int] = {}
        for a in store.active_allocations():
            busy.setdefault(a.agent_id, []).extend(a.gpu_indices)
            count[a.agent_id] = count.get(a.agent_id, 0) + 1
        return [
            AgentView(
                id=r.id,
                name=r.name,
                status=label(r.status),
                inventory=stored.inventory(r.id, r.inventory),
                running_jobs=count.get(r.id, 0),
                # Heard from since the last batch was written (coordinator/leases.py): memory is newer.
                last_heartbeat_ns=core.engine.leases.last_heard(r.id) or r.last_heartbeat or 0,
                busy_gpu_indices=sorted(busy.get(r.id, [])),
            )
            for r in store.list_agents()
        ]

    return await core.read(load)


async def remove(core: Core, name: str, by: str) -> int:
    """An admin removes an agent: its credential is refused from now on (coordinator/auth.py), its
    jobs fail saying so, it is told to stop them, and its stream is dropped. Returns how many jobs
    failed."""
    removal = await core.db(core.store.remove_agent, name)
    core.engine.on_agent_removed(removal.agent_id, removal.failed_jobs)
    log.warning("agent %s (%s) removed by %s; %d job(s) failed", name, removal.agent_id, by, len(removal.failed_jobs))
    return len(removal.failed_jobs)


async def approve(core: Core, name: str, by: str) -> None:
    """An admin lets a pending agent into the pool: it gets jobs from the next scheduling pass."""
    engine = core.engine
    connected = engine.hub.connected_ids()
    agent_id = await core.db(core.store.approve_agent, name, connected.__contains__, engine.lease_until())
    if agent_id in connected:
        engine.agent_online(agent_id)  # its lease, in memory (coordinator/leases.py)
    log.info("agent %s (%s) approved by %s", name, agent_id, by)
    engine.kick()
