"""Refusals that both sides of the agent protocol read: the coordinator words them, the agent
recognizes them (agent/retry.py) and stops instead of retrying."""

from __future__ import annotations

AGENT_REMOVED = "this agent was removed by an admin"


def agent_removed(name: str) -> str:
    return f"{AGENT_REMOVED} (agent {name}): its credential is revoked"


def is_agent_removed(details: str | None) -> bool:
    return (details or "").startswith(AGENT_REMOVED)
