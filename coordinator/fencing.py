"""Fencing: what a stale agent (one declared lost, or an old stream of it) can no longer do.

Two tokens, both checked by the coordinator (docs/architecture.md, "Fencing"):

- the **attempt** in an assignment's wire id (coordinator/attempts.py): every report (status, log
  line, port, artifact grant or commit) names one, and only the job's current attempt on that agent
  is applied (coordinator/store/scope.py). An attempt that ended because its agent was lost is
  closed: its late lines and updates are refused (logged, acknowledged so an honest agent stops
  resending them).
- the **session epoch** of an agent's stream (`Sessions`): each hello opens a new epoch, and losing
  the agent (its lease ran out) or removing it ends the current one; what arrives on a stream whose
  epoch is over is refused and the stream ends, so nothing read late on a dropped stream is applied.

And one guard on capacity (`Quarantine`): an agent that comes back still running attempts that are
over holds no new job until it has confirmed them dead (their final update, or a hello that no
longer lists them), or a bound on the monotonic clock has passed: no GPU is held by two jobs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

log = logging.getLogger("dstack.coordinator")


def quarantine_bound_s(lease_timeout_s: float) -> float:
    """How long an agent that does not confirm its stale attempts dead is kept from new jobs. An
    honest agent confirms within its abort (SIGKILL, a container's removal): seconds. The bound only
    keeps a broken agent from holding its capacity hostage forever; it is logged when it is reached."""
    return max(60.0, 4 * lease_timeout_s)


class Sessions:
    """The current session epoch of each connected agent (event loop only). Epochs are per process:
    a coordinator restart drops every stream, so each agent starts over with a hello."""

    def __init__(self) -> None:
        self._next = 0
        self._current: dict[str, int] = {}

    def open(self, agent_id: str) -> int:
        """A hello: this stream's epoch, which supersedes every earlier one of the agent."""
        self._next += 1
        self._current[agent_id] = self._next
        return self._next

    def end(self, agent_id: str) -> None:
        """The agent was lost or removed: no stream it opened so far may report any more."""
        self._current.pop(agent_id, None)

    def is_current(self, agent_id: str, epoch: int) -> bool:
        return self._current.get(agent_id) == epoch


class Quarantine:
    """Agents kept from new jobs while they may still run attempts that are over (`wire ids`), each
    until a monotonic deadline. Written on the event loop; the scheduling pass (DB thread) reads
    `held()`, a mapping replaced whole on every change, never mutated in place."""

    def __init__(self) -> None:
        self._stale: dict[str, dict[str, float]] = {}  # agent -> wire id -> deadline (monotonic s)
        self._until: dict[str, float] = {}  # agent -> latest deadline (copy on write)

    def hold(self, agent_id: str, wire_ids: Iterable[str], until: float) -> None:
        """What the agent runs, as its hello says: the whole set (a hello is the agent's truth, so an
        attempt it no longer lists is dead)."""
        stale = {w: until for w in wire_ids}
        if stale:
            self._stale[agent_id] = stale
        else:
            self._stale.pop(agent_id, None)
        self._publish()

    def narrow(self, agent_id: str, wire_ids: Iterable[str]) -> None:
        """Of what was held, only `wire_ids` are stale (the others are current attempts, which the
        store accounts for)."""
        keep = set(wire_ids)
        stale = {w: d for w, d in self._stale.get(agent_id, {}).items() if w in keep}
        if stale:
            self._stale[agent_id] = stale
        else:
            self._stale.pop(agent_id, None)
        self._publish()

    def ended(self, agent_id: str, wire_id: str) -> bool:
        """The agent reported the attempt's end (its process is gone). True: the agent is free now."""
        stale = self._stale.get(agent_id)
        if stale is None or stale.pop(wire_id, None) is None:
            return False
        log.info("agent %s: stale attempt %s confirmed ended", agent_id, wire_id)
        if stale:
            return False
        del self._stale[agent_id]
        self._publish()
        return True

    def expire(self, now: float) -> list[str]:
        """Drops what passed its deadline (logged: the agent never confirmed); returns the agents freed."""
        freed = []
        for agent_id, stale in list(self._stale.items()):
            late = [w for w, d in stale.items() if d <= now]
            for w in late:
                del stale[w]
                log.warning(
                    "agent %s never confirmed that stale attempt %s ended; its capacity is used again", agent_id, w
                )
            if not stale:
                del self._stale[agent_id]
                freed.append(agent_id)
        if freed:
            self._publish()
        return freed

    def forget(self, agent_id: str) -> None:
        if self._stale.pop(agent_id, None) is not None:
            self._publish()

    def held(self) -> dict[str, float]:
        """agent -> until when it is held (monotonic s); read-only for the caller."""
        return self._until

    def _publish(self) -> None:
        self._until = {a: max(s.values()) for a, s in self._stale.items()}
