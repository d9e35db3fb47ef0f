"""Ports the agent picks for `ports: N` (2022): free on this host, and held for one job until it ends.

A job that asks for N ports gets N that nothing on the host listens on when the job starts (bind-tested
on every address, where jobs are told to listen: 0.0.0.0) and that no other job of this agent holds,
whether picked for it or written in its `ports: [..]` list. Inside a container a picked port has the
same number as outside (the Docker runtime publishes PORT:PORT), so `$PORT_i` is right on both sides.

Nothing stops another program on the host from taking a port between the test and the job's own
bind; 2022 dstack had the same window. `dstack agent --job-ports LO-HI` keeps the picks in a range
(for a firewall, or to keep away from the kernel's ephemeral ports).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable

# Kernel-picked ports (bind to port 0) until this many tries found too few: the kernel hands out a
# port nobody has bound, so this is only reached when the host is nearly out of ports.
_TRIES_PER_PORT = 20


class PortError(Exception):
    """Too few free ports for a job (it fails with reason `executor error`)."""


def parse_range(text: str) -> tuple[int, int]:
    """`20000-20999` -> (20000, 20999); a ValueError says what is wrong."""
    lo, dash, hi = text.partition("-")
    if not dash or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise ValueError(f"{text!r} is not a range LO-HI such as 20000-20999")
    first, last = int(lo), int(hi)
    if not 1024 <= first <= last <= 65535:
        raise ValueError(f"{text!r}: give 1024 <= LO <= HI <= 65535")
    return first, last


def is_free(port: int) -> bool:
    """Whether a listener could bind `port` on every IPv4 and IPv6 address of this host now (nothing
    listens there; with SO_REUSEADDR, as servers bind, so a port in TIME_WAIT counts as free)."""
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this host: nothing can listen there either
        try:
            # As servers bind (http.server, uvicorn, ...): connections of a job that ended, still in
            # TIME_WAIT on the port, do not keep the next job from listening there.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((address, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            if family == socket.AF_INET:
                return False
            # IPv6 present but unusable (EADDRNOTAVAIL with ipv6.disable): only IPv4 counts.
        finally:
            s.close()
    return True


def _kernel_pick() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        port: int = s.getsockname()[1]
        return port


class PortPool:
    """The ports this agent's jobs hold, by job; one per agent (agent/connection.py)."""

    def __init__(self, port_range: tuple[int, int] | None = None) -> None:
        self.port_range = port_range
        self._held: dict[str, set[int]] = {}

    def held(self) -> set[int]:
        return set().union(*self._held.values()) if self._held else set()

    def reserve(self, job_id: str, count: int, fixed: Iterable[int] = ()) -> list[int]:
        """`count` free ports for the job, held with its `fixed` host ports until release(job_id)."""
        fixed = set(fixed)
        if not count and not fixed:  # most jobs: nothing to pick or hold (and no scan of the other jobs' ports)
            self._held.pop(job_id, None)
            return []
        taken = self.held() | fixed
        picked: list[int] = []
        if count:
            candidates = self._candidates(count, taken)
            for port in candidates:
                if port not in taken and port not in picked and is_free(port):
                    picked.append(port)
                    if len(picked) == count:
                        break
        if len(picked) < count:
            where = f"in its range {self.port_range[0]}-{self.port_range[1]} (--job-ports)" if self.port_range else ""
            raise PortError(
                f"`ports: {count}`: this agent found only {len(picked)} free port(s) {where}".rstrip()
                + f" ({len(self.held())} held by its other jobs); run the job when others have ended, or ask for fewer"
            )
        self._held[job_id] = fixed | set(picked)
        return picked

    def release(self, job_id: str) -> None:
        self._held.pop(job_id, None)

    def _candidates(self, count: int, taken: set[int]) -> Iterable[int]:
        if self.port_range is not None:
            return range(self.port_range[0], self.port_range[1] + 1)
        return (_kernel_pick() for _ in range(count * _TRIES_PER_PORT))
