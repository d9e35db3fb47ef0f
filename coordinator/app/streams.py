"""How many long-lived calls are open, per user and in all, and the file descriptors behind them.

A followed log (`dstack logs -f`, the HTTP API's event streams), a tunnel (`dstack port-forward`,
`dstack attach`) or a download holds a connection, buffers and a task in the coordinator for as long
as its client keeps it. Without a bound, one member with a valid token could open thousands and use up
the coordinator's file descriptors or memory for everyone, agents included. Each such call takes a
`StreamTicket` first (refused with LimitExceeded: RESOURCE_EXHAUSTED, HTTP 429, naming the limit and
its option) and gives it back however it ends; `close` may be called more than once, so each front
end gives it back from every way out it has (the handler's own end, and the call's done callback).

The counts live in the event loop's thread only: no lock.
"""

from __future__ import annotations

import logging
import resource
from collections import Counter
from dataclasses import dataclass, field

from dstack.coordinator.errors import LimitExceeded

DEFAULT_MAX_STREAMS_PER_USER = 64
DEFAULT_MAX_STREAMS = 4096
DEFAULT_STREAM_STALL_S = 60.0

log = logging.getLogger("dstack.coordinator")


@dataclass
class StreamTicket:
    """One open long-lived call; `close` gives its place back (once, however often it is called)."""

    limits: StreamLimits
    user: str
    what: str
    closed: bool = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.limits._release(self.user)


@dataclass
class StreamLimits:
    per_user: int  # 0: no limit
    total: int  # 0: no limit
    stall_s: float = DEFAULT_STREAM_STALL_S  # a client that takes nothing for this long is dropped
    _open: Counter[str] = field(default_factory=Counter)
    open_total: int = 0
    refused: int = 0  # calls refused by either limit, since start (/metrics)
    dropped_slow: int = 0  # streams ended because their client did not read (/metrics)

    def open(self, user: str, what: str) -> StreamTicket:
        """A ticket for one more long-lived call of `user` (`what` names it in refusals), or LimitExceeded."""
        if self.per_user > 0 and self._open[user] >= self.per_user:
            self.refused += 1
            raise LimitExceeded(
                f"{what} refused: user {user} already has {self._open[user]} streams open (followed logs, tunnels,"
                f" downloads), the limit per user is {self.per_user} (dstack server --max-streams-per-user):"
                " close some, or ask an admin to raise it"
            )
        if self.total > 0 and self.open_total >= self.total:
            self.refused += 1
            log.warning("stream refused: %d streams open, the limit of --max-streams", self.open_total)
            raise LimitExceeded(
                f"{what} refused: the coordinator has {self.open_total} streams open, its limit for all users"
                f" together (dstack server --max-streams {self.total}): try again later, or ask an admin to raise it"
            )
        self._open[user] += 1
        self.open_total += 1
        return StreamTicket(self, user, what)

    def open_of(self, user: str) -> int:
        return self._open[user]

    def _release(self, user: str) -> None:
        self._open[user] -= 1
        if self._open[user] <= 0:
            del self._open[user]
        self.open_total -= 1


def raise_fd_limit() -> tuple[int, int]:
    """Raises this process's soft limit on open files to its hard limit, and says what it has.

    Every agent holds a connection (5,000 agents: 5,000 descriptors), and so does every stream; the
    usual soft limit of 1,024 would refuse connections long before. Returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard
        if hard == resource.RLIM_INFINITY:
            target = 1 << 20  # the kernel's usual nr_open: an unlimited soft limit is refused
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("could not raise the open files limit from %d to %d: %s", soft, target, e)
    return soft, hard
