"""Agents' leases, kept in memory: renewed by every message an agent sends, checked by the lease loop.

A lease is a deadline on the coordinator's monotonic clock (a wall-clock step must not end it). It
used to be one database write per heartbeat, queued on the one DB thread behind scheduling passes and
log inserts: at 5,000 agents a heartbeat could wait longer than a lease to be recorded, and a healthy
agent was declared lost. Here a renewal is a dict write on the event loop, done as a message is read
(coordinator/services/agent.py), before anything of it waits for the database.

What the database keeps is for people and restarts, written in batches (`take_heard`): when each agent
was last heard from (`dstack agents`, forgetting lost agents). A monotonic deadline means nothing to a
restarted coordinator anyway: start-up gives every online agent a fresh lease plus the reconnect grace.
"""

from __future__ import annotations

from collections.abc import Iterable


class Leases:
    def __init__(self) -> None:
        self._until: dict[str, float] = {}  # agent -> monotonic deadline (s); only agents that hold a lease
        self._heard: dict[str, int] = {}  # agent -> wall ns it was last heard from, not yet written down
        self._last_heard_wall: dict[str, int] = {}  # agent -> wall ns last heard (shown over the stored one)
        self._last_heard_mono: dict[str, float] = {}  # agent -> monotonic s last heard (gap measurement)
        self.max_gap_s = 0.0  # the longest silence of an agent that held a lease, between two messages
        # Agents whose stream we stopped reading (their messages wait unread in the transport, behind a full
        # inbox: coordinator/services/agent.py) -> how many of their streams are so held. Our backlog, not
        # their silence: such a lease does not run out while held, and starts afresh when it is released.
        self._backlogged: dict[str, int] = {}

    def grant(self, agent_id: str, until: float, heard_at: float | None = None) -> None:
        """The agent is online (its hello, its approval, a start-up): it holds a lease until `until`.
        `heard_at` (monotonic s): it was heard from then (a hello): a silence is counted from there, not
        from its last message on an earlier stream (so `max_gap_s` leaves out its reconnect).
        A lease it holds already keeps its later end: a hello soon after a restart must not cut the restart
        lease, which agents refused while we were down count on (coordinator/restart_lease.py)."""
        self._until[agent_id] = max(until, self._until.get(agent_id, until))
        if heard_at is not None:
            self._last_heard_mono[agent_id] = heard_at

    def holds(self, agent_id: str) -> bool:
        return agent_id in self._until

    def renew(self, agent_id: str, now: float, until: float, wall_ns: int) -> None:
        """The agent was heard from: a lease it holds runs until `until`. One it does not hold (pending
        approval, lost, removed) is not created here: only a hello or an approval makes it online."""
        if agent_id not in self._until:
            return
        before = self._last_heard_mono.get(agent_id)
        if before is not None and now - before > self.max_gap_s:
            self.max_gap_s = now - before
        self._last_heard_mono[agent_id] = now
        self._until[agent_id] = max(self._until[agent_id], until)
        self._heard[agent_id] = wall_ns
        self._last_heard_wall[agent_id] = wall_ns

    def extend_all(self, until: float) -> None:
        """Every lease runs at least until `until` (the store could not record a loss, or the coordinator
        stalled: see engine)."""
        for agent_id, current in self._until.items():
            if current < until:
                self._until[agent_id] = until

    def expired(self, now: float) -> list[str]:
        return [a for a, until in self._until.items() if until < now and a not in self._backlogged]

    def still_expired(self, agent_id: str, now: float) -> bool:
        """Read on the DB thread as it marks agents lost: a message read meanwhile saves the agent, and so
        does a stream of its that we stopped reading meanwhile (its messages arrived; we did not read them)."""
        until = self._until.get(agent_id)
        return until is not None and until < now and agent_id not in self._backlogged

    def hold(self, agent_id: str) -> None:
        """We stopped reading the agent's stream (its inbox is full: what it sent waits for the database,
        and what it sends now, heartbeats too, waits unread in the transport). While held its lease does not
        run out: the agent is not silent, we are not listening (as the stall guard says for a stalled loop)."""
        self._backlogged[agent_id] = self._backlogged.get(agent_id, 0) + 1

    def release(self, agent_id: str, now: float, until: float) -> None:
        """We read the agent's stream again: its lease starts afresh (`until`), as after a stall. An agent
        that is really gone is lost a lease later."""
        n = self._backlogged.get(agent_id, 0) - 1
        if n > 0:
            self._backlogged[agent_id] = n
            return
        self._backlogged.pop(agent_id, None)
        if agent_id in self._until:
            self._until[agent_id] = max(self._until[agent_id], until)
            self._last_heard_mono[agent_id] = now  # the time held is our silence, not the agent's

    def backlogged(self, agent_id: str) -> bool:
        return agent_id in self._backlogged

    def forget(self, agent_id: str) -> None:
        """The agent is lost, removed or forgotten: it holds no lease until its next hello."""
        self._until.pop(agent_id, None)
        self._last_heard_mono.pop(agent_id, None)
        self._last_heard_wall.pop(agent_id, None)
        # _heard is kept: when it was last heard from is still written down at the next flush.

    def keep_only(self, agent_ids: Iterable[str]) -> None:
        ids = set(agent_ids)
        for agent_id in [a for a in self._until if a not in ids]:
            self.forget(agent_id)

    def ids(self) -> set[str]:
        return set(self._until)

    def take_heard(self) -> dict[str, int]:
        """When each agent heard from since the last call was last heard from (wall ns), to be written down."""
        heard, self._heard = self._heard, {}
        return heard

    def put_back(self, heard: dict[str, int]) -> None:
        """A flush that failed: its stamps go out with the next one (newer ones win)."""
        for agent_id, at in heard.items():
            self._heard.setdefault(agent_id, at)

    def last_heard(self, agent_id: str) -> int | None:
        """Wall ns the agent was last heard from, if it holds a lease and was heard since its hello."""
        return self._last_heard_wall.get(agent_id)
