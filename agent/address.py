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


def master_port(gang: str, node_rank: int, env: dict[str, str]) -> int | None:
    """The MASTER_PORT this agent must serve: a gang's rank 0 only (None for every other job)."""
    port = env.get("MASTER_PORT", "")
    return int(port) if gang and node_rank == 0 and port.isdigit() else None


def check_port_free(port: int) -> None:
    """Raises RuntimeError when another program holds `port` here. The coordinator picks a gang's
    MASTER_PORT among ports no gang of its own holds on this agent, but cannot see other programs';
    this turns such a clash into a job that fails at once, saying so (with `retry: {on: [error]}` the
    gang reruns, at another random port), instead of members that wait for a master that never binds."""
    try:
        with socket.create_server(("", port)):  # SO_REUSEADDR, as the job's own server will
            pass
    except OSError as e:
        raise RuntimeError(
            f"MASTER_PORT {port} is taken on this host ({e.strerror or e}): another program listens there"
        ) from None
