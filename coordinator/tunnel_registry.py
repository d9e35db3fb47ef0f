"""Tunnels asked of agents and not yet answered (docs/tunnels.md), live state of the coordinator process.

The coordinator names each tunnel with an unguessable id (`secrets.token_urlsafe`, 192 bits) bound to
the agent it asked; the agent's stream must name it first. An id is claimed once, only by that agent,
and forgotten when its CLI stream stops waiting: a stale, reused or foreign id is refused with
Forbidden, which tells the caller nothing about other tunnels.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from dstack.coordinator.errors import Forbidden

P = TypeVar("P")


@dataclass
class _Pending(Generic[P]):
    agent_id: str
    answer: asyncio.Future[P] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class TunnelRegistry(Generic[P]):
    """Tunnels asked of agents and not yet answered (in the event loop only; no locking needed)."""

    def __init__(self) -> None:
        self._pending: dict[str, _Pending[P]] = {}

    def expect(self, agent_id: str) -> tuple[str, asyncio.Future[P]]:
        """A new tunnel id for `agent_id`, and the future its agent's stream resolves."""
        tunnel_id = secrets.token_urlsafe(24)
        pending: _Pending[P] = _Pending(agent_id)
        self._pending[tunnel_id] = pending
        return tunnel_id, pending.answer

    def forget(self, tunnel_id: str) -> None:
        self._pending.pop(tunnel_id, None)

    def claim(self, tunnel_id: str, agent_id: str, peer: P) -> None:
        """Hands the agent's side to the waiting CLI stream: once, and only from the agent asked."""
        pending = self._pending.get(tunnel_id)
        if pending is None or pending.agent_id != agent_id or pending.answer.done():
            raise Forbidden("unknown tunnel id: it was never asked of this agent, was answered already, or expired")
        del self._pending[tunnel_id]
        pending.answer.set_result(peer)

    def __len__(self) -> int:
        return len(self._pending)
