"""What an agent may advertise as the address its peers reach it at (a multi-node gang's MASTER_ADDR):
shared by the agent, which checks its --advertise-address, and the coordinator, which hands no other
value to a gang's members (docs/multinode.md)."""

from __future__ import annotations

import ipaddress
import re

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def valid_address(text: str) -> bool:
    """An IP address or a host name: what an agent may advertise as a gang's MASTER_ADDR."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(text))
