"""The agent pool: registration (join token, checked by coordinator/auth.py) and listing."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

from dstack.coordinator.app.core import Core
from dstack.coordinator.convert import inventory_from_bytes, inventory_to_bytes
from dstack.coordinator.errors import AlreadyExists
from dstack.coordinator.model import AgentView, Inventory

log = logging.getLogger("dstack.coordinator")


@dataclass(frozen=True)
class Registration:
    agent_id: str
    agent_token: str


async def register(core: Core, name: str, inventory: Inventory) -> Registration:
    """A new agent (the caller showed the join token): its id and its own token."""
    token = secrets.token_urlsafe(32)
    name = name or inventory.hostname or "agent"
    try:
        agent_id = await core.db(core.store.register_agent, name, token, inventory_to_bytes(inventory))
    except AlreadyExists as e:
        log.warning("registration refused (host %s): %s", inventory.hostname or "?", e)
        raise
    log.info("agent %s registered as %s", name, agent_id)
    return Registration(agent_id, token)


async def list_agents(core: Core) -> list[AgentView]:
    def load() -> list[AgentView]:
        busy: dict[str, list[int]] = {}
        count: dict[str, int] = {}
        for a in core.store.active_allocations():
            busy.setdefault(a.agent_id, []).extend(a.gpu_indices)
            count[a.agent_id] = count.get(a.agent_id, 0) + 1
        return [
            AgentView(
                id=r.id,
                name=r.name,
                status=r.status,
                inventory=inventory_from_bytes(r.inventory),
                running_jobs=count.get(r.id, 0),
                last_heartbeat_ns=r.last_heartbeat or 0,
                busy_gpu_indices=sorted(busy.get(r.id, [])),
            )
            for r in core.store.list_agents()
        ]

    return await core.db(load)
