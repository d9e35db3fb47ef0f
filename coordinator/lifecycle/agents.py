"""The agent state machine: every allowed transition of an agent's status in one table, and the only
code that writes one (`move_agents`; an agent's row is created by the store in the state of its
creation transition, `REGISTER` or `REGISTER_PENDING`).

As for jobs, each write is an UPDATE guarded in SQL by the transition's allowed `from` states, so a
removal racing with a hello (or a lease expiry racing with an approval) cannot resurrect an agent:
the second writer finds nothing to update.
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


class AgentStatus(enum.StrEnum):
    """Stored as the value; shown (`dstack agents`) as the label."""

    REGISTERED = "registered"  # enrolled (or approved while away), not connected since
    PENDING = "pending"  # enrolled under `dstack server --approve-agents`: no job until approved
    ONLINE = "online"
    LOST = "lost"  # its lease ran out
    REMOVED = "removed"  # `dstack agents remove`: its credential is refused, its name is free
    RETIRED = "retired"  # out of the pool (its name taken, or forgotten); kept while jobs refer to it

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    AgentStatus.REGISTERED: "never connected",
    AgentStatus.PENDING: "pending approval",
    AgentStatus.ONLINE: "online",
    AgentStatus.LOST: "lost",
    AgentStatus.REMOVED: "removed",
    AgentStatus.RETIRED: "retired",
}


def label(status: str) -> str:
    try:
        return AgentStatus(status).label
    except ValueError:  # a newer coordinator's status, read by an older one
        return status


AS = AgentStatus
# The agent's credential works in these (an agent in another state is refused by coordinator/auth.py).
ENROLLED = frozenset({AS.REGISTERED, AS.PENDING, AS.ONLINE, AS.LOST})
# These hold their name: a new registration may take it only from one that is not online.
IN_POOL = ENROLLED


@dataclass(frozen=True)
class AgentTransition:
    name: str
    src: frozenset[AgentStatus]  # empty: the agent is created in `dst`
    dst: AgentStatus
    actor: str  # agent, admin, system
    cause: str


def _t(name: str, src: Iterable[AgentStatus], dst: AgentStatus, actor: str, cause: str) -> AgentTransition:
    return AgentTransition(name, frozenset(src), dst, actor, cause)


REGISTER = _t("register", (), AS.REGISTERED, "agent", "Register with a valid join token")
REGISTER_PENDING = _t(
    "register-pending", (), AS.PENDING, "agent", "Register with a valid join token, under `--approve-agents`"
)
CONNECT = _t("connect", (AS.REGISTERED, AS.ONLINE, AS.LOST), AS.ONLINE, "agent", "its stream's hello")
LOSE = _t("lose", (AS.ONLINE,), AS.LOST, "system", "its lease ran out (its jobs fail)")
APPROVE = _t("approve", (AS.PENDING,), AS.REGISTERED, "admin", "`dstack agents approve` while it is not connected")
APPROVE_CONNECTED = _t(
    "approve-connected", (AS.PENDING,), AS.ONLINE, "admin", "`dstack agents approve` while it is connected"
)
REMOVE = _t(
    "remove",
    ENROLLED,
    AS.REMOVED,
    "admin",
    "`dstack agents remove`: its credential is refused, its stream dropped, its jobs fail",
)
RETIRE = _t(
    "retire",
    (AS.REGISTERED, AS.PENDING, AS.LOST, AS.REMOVED),
    AS.RETIRED,
    "system",
    "a new agent took its name, or it was not heard from for `--forget-lost-agents-after`"
    " (the row is deleted unless jobs refer to it)",
)

AGENT_TRANSITIONS: tuple[AgentTransition, ...] = (
    REGISTER,
    REGISTER_PENDING,
    CONNECT,
    LOSE,
    APPROVE,
    APPROVE_CONNECTED,
    REMOVE,
    RETIRE,
)


def sql_list(values: Iterable[AgentStatus]) -> str:
    return ",".join(f"'{v.value}'" for v in sorted(values))  # our own constants, never user input


def move_agents(
    c: sqlite3.Connection, t: AgentTransition, where: str, params: dict[str, Any], *, also: str = ""
) -> list[str]:
    """Moves the agents matched by `where` (named parameters) that are in one of `t`'s `from` states;
    returns their ids. `also` sets more columns in the same statement."""
    if not t.src:
        raise ValueError(f"transition {t.name} creates agents: it is an INSERT, not a move")
    sets = ", ".join(["status = :_dst", *([also] if also else [])])
    sql = f"UPDATE agents SET {sets} WHERE ({where}) AND status IN ({sql_list(t.src)}) RETURNING id"
    return [r[0] for r in c.execute(sql, {**params, "_dst": t.dst.value}).fetchall()]


_ORDER = list(AgentStatus)


def markdown_lines() -> list[str]:
    out = ["Agent transitions (`dstack.coordinator.lifecycle.agents`, the only code that writes an agent's status):"]
    out += ["", "| name | from | to | who | when |", "| --- | --- | --- | --- | --- |"]
    for t in AGENT_TRANSITIONS:
        src = ", ".join(f"`{s.value}`" for s in sorted(t.src, key=_ORDER.index)) if t.src else "(created)"
        out.append(f"| {t.name} | {src} | `{t.dst.value}` | {t.actor} | {t.cause} |")
    out += ["", "`dstack agents` shows `registered` as `never connected` and `pending` as `pending approval`;"]
    out += ["`retired` agents are not listed."]
    return out
