"""The address other agents reach this one at: a multi-node gang's MASTER_ADDR when this agent runs
its rank 0 (docs/multinode.md). `dstack agent --advertise-address` sets it; by default it is the
source address of this host's route to the coordinator, which is the interface peers on the same
network see (a UDP socket's connect picks the route and sends nothing)."""

from __future__ import annotations

import logging
import socket

log = logging.getLogger("dstack.agent")


def coordinator_host(coordinator: str) -> str:
    """HOST of `HOST:PORT` or `[V6]:PORT`; "" for a unix socket."""
    if coordinator.startswith("unix:"):
        return ""
    host = coordinator.rsplit(":", 1)[0] if coordinator.count(":") == 1 or "]" in coordinator else coordinator
    return host.strip("[]")


def detect(coordinator: str) -> str:
    """The source address of the route to the coordinator; 127.0.0.1 when it is on a unix socket or
    the route cannot be found (then peers on other hosts cannot reach this one: say so)."""
    host = coordinator_host(coordinator)
    if not host:
        return "127.0.0.1"
    try:
        infos = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)
        family, _, _, _, sockaddr = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr)
            address = str(s.getsockname()[0])
    except OSError as e:
        log.warning(
            "cannot find this host's address towards %s (%s): multi-node jobs see 127.0.0.1; give --advertise-address",
            coordinator,
            e,
        )
        return "127.0.0.1"
    return address
