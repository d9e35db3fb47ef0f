"""A multi-host test bed on one machine: network namespaces, each with its own address.

    host (coordinator, CLI)  10.213.S.1 ── veth ──┐
                                                  hub namespace: bridge br0
    namespace 1 (agent)      10.213.S.2 ── veth ──┤
    namespace 2 (agent)      10.213.S.3 ── veth ──┘   ...

The bridge lives in a namespace of its own (the hub), not on the host: traffic between the agents'
namespaces is bridged there, where no firewall rules apply, so a host whose FORWARD policy drops
(Docker sets it so) does not break it; traffic to the host's address is the host's own input.
Every name carries a random tag, and the subnet S is one no interface of the host uses, so beds of
tests run at the same time stay apart. `close()` deletes the namespaces (their veths go with them);
use it in a `finally` or through the `netns_bed` fixture.

Needs CAP_NET_ADMIN (root) and iproute2's `ip`; `available()` says whether both are there, and tests
skip otherwise. Only addresses inside the bed's own subnet are ever used.

Issue 16's chaos bed reuses this: `Namespace.run` runs a command inside (e.g. `ip link set eth0
down`, or `tc qdisc add dev eth0 root netem loss 10%`) to cut or degrade one host's network.
"""

from __future__ import annotations

import functools
import os
import random
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field

SUBNET_PREFIX = "10.213"


class NetnsError(RuntimeError):
    pass


def _ip(*args: str, netns: str = "") -> str:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r.stdout


@functools.cache
def available() -> str | None:
    """None when namespaces can be made here; else why not (for pytest.skip)."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need CAP_NET_ADMIN (run as root)"
    probe = f"dsp{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except NetnsError as e:
        return f"cannot create a network namespace: {e}"
    try:
        _ip("netns", "del", probe)
    except NetnsError:
        pass
    return None


@dataclass(frozen=True)
class Namespace:
    name: str
    address: str  # its address on the bed's subnet

    def prefix(self) -> list[str]:
        """What to put before a command to run it inside (`subprocess.Popen(ns.prefix() + argv)`)."""
        return ["ip", "netns", "exec", self.name]

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix(), *argv], capture_output=True, text=True, timeout=30)


@dataclass
class NetnsBed:
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    subnet: int = 0
    namespaces: list[Namespace] = field(default_factory=list)
    _hub: str = ""
    _host_if: str = ""

    @property
    def host_address(self) -> str:
        """The host's address on the bed (where the coordinator listens)."""
        return f"{SUBNET_PREFIX}.{self.subnet}.1"

    def start(self) -> NetnsBed:
        used = _ip("-4", "-o", "addr", "show")
        free = [s for s in range(1, 255) if f" {SUBNET_PREFIX}.{s}." not in used]
        if not free:
            raise NetnsError(f"every {SUBNET_PREFIX}.S.0/24 is in use on this host")
        self.subnet = random.choice(free)
        self._hub = f"dsh{self.tag}"
        self._host_if = f"dsh{self.tag}"  # the host's end of the veth to the hub (names are per namespace)
        _ip("netns", "add", self._hub)
        try:
            _ip("link", "set", "lo", "up", netns=self._hub)
            _ip("link", "add", "br0", "type", "bridge", netns=self._hub)
            _ip("link", "set", "br0", "up", netns=self._hub)
            _ip("link", "add", self._host_if, "type", "veth", "peer", "name", "up0", "netns", self._hub)
            _ip("link", "set", "up0", "master", "br0", "up", netns=self._hub)
            _ip("addr", "add", f"{self.host_address}/24", "dev", self._host_if)
            _ip("link", "set", self._host_if, "up")
        except BaseException:
            self.close()
            raise
        return self

    def add(self) -> Namespace:
        """A new namespace on the bed, with its own address; loopback up."""
        k = len(self.namespaces)
        ns = Namespace(f"dsn{self.tag}{k}", f"{SUBNET_PREFIX}.{self.subnet}.{k + 2}")
        _ip("netns", "add", ns.name)
        self.namespaces.append(ns)
        _ip("link", "set", "lo", "up", netns=ns.name)
        _ip("link", "add", f"p{k}", "type", "veth", "peer", "name", "eth0", "netns", ns.name, netns=self._hub)
        _ip("link", "set", f"p{k}", "master", "br0", "up", netns=self._hub)
        _ip("addr", "add", f"{ns.address}/24", "dev", "eth0", netns=ns.name)
        _ip("link", "set", "eth0", "up", netns=ns.name)
        return ns

    def close(self) -> None:
        """Deletes every namespace of the bed (their veths, and the host's, go with them). Processes
        still inside keep their namespace alive until they exit: stop them first."""
        errors = []
        for name in [n.name for n in self.namespaces] + ([self._hub] if self._hub else []):
            try:
                _ip("netns", "del", name)
            except NetnsError as e:
                errors.append(str(e))
        self.namespaces.clear()
        if self._host_if:
            try:
                _ip("link", "del", self._host_if)
            except NetnsError:
                pass  # gone with the hub, as it should be
        self._hub = self._host_if = ""
        if errors:
            raise NetnsError("; ".join(errors))
