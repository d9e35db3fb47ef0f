"""A multi-host pool on one machine, and the faults a real pool meets.

    client (this process, root namespace)  10.214.S.1 ─┐
    coordinator host   10.214.S.2 ─┐                   │
    S3 host (weed)     10.214.S.3 ─┼── veths ── hub namespace: bridge br0
    agent hosts        10.214.S.4+ ┘

Every host is a network namespace of its own with a private mount namespace beside it (held by a `sleep`
started with `unshare --mount --propagation private`), so a small tmpfs can sit under the coordinator's
state folder or an agent's home without the rest of the machine seeing it; it goes away with the holder.
Processes run in both through `nsenter` (`Host.prefix()`), as the real programs (python -m dstack...,
weed): kill -9 is a real SIGKILL of that process.

Faults: `kill9`/`restart_*` (any process), `isolate` (a host's link down at the switch, silent drops),
`cut` (the two hosts drop each other's packets, nftables in their own namespaces), `step_clock` (the
coordinator's test wall-clock offset, coordinator/clock.py), `fill_disk` (the host's tmpfs filled to the
last byte), and an S3 outage (isolate or kill the S3 host's weed).

Names carry the prefix `dsc` and a random tag; the root namespace only ever gets the one veth of the bed
(`dsc<tag>`) and its address on a /24 no interface uses. `cleanup_stale()` removes what an earlier run
left behind (a crash, a SIGKILL): beds whose owner process is gone (its pid is in /run/dstack-chaos).
Needs root, iproute2, util-linux (nsenter, unshare, mount) and nft; `available()` says why not.
"""

from __future__ import annotations

import errno
import functools
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dstack.api import Client
from dstack.storage.devserver import SeaweedServer, weed_binary

REPO = Path(__file__).resolve().parent.parent.parent
PY = sys.executable
PREFIX = "dsc"
SUBNET_PREFIX = "10.214"
OWNERS = Path("/run/dstack-chaos")  # TAG -> the pid of the process that owns that bed
COORDINATOR_PORT = 7070
ADMIN_TOKEN = "chaos-admin-token"
JOIN_TOKEN = "chaos-join-token"
FILLER = ".chaos-filler"


class BedError(RuntimeError):
    pass


def _run(cmd: Sequence[str], stdin: str | None = None, check: bool = True) -> str:
    r = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise BedError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


@functools.cache
def available() -> str | None:
    """None when the bed can be made here; else why not (for pytest.skip)."""
    for tool in ("ip", "nsenter", "unshare", "mount", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2, util-linux, nftables)"
    if os.geteuid() != 0:
        return "the chaos bed needs root (network and mount namespaces)"
    probe = f"{PREFIX}p{secrets.token_hex(3)}"
    try:
        _run(["ip", "netns", "add", probe])
    except BedError as e:
        return f"cannot create a network namespace: {e}"
    try:
        _run(["ip", "netns", "exec", probe, "nft", "add", "table", "inet", "probe"])
    except BedError as e:
        return f"nftables does not work in a network namespace: {e}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    try:
        weed_binary()
    except FileNotFoundError as e:
        return str(e)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Removes beds of earlier runs whose owner is gone: kills what still runs in their namespaces (the
    holders' mount namespaces and tmpfs go with them), deletes the namespaces and the root's veth.
    Returns the tags removed. Beds of live owners (another test or benchmark now) are left alone."""
    removed = []
    names = [ln.split()[0] for ln in _run(["ip", "netns", "list"], check=False).splitlines() if ln.strip()]
    tags = {n[len(PREFIX) : len(PREFIX) + 4] for n in names if n.startswith(PREFIX) and len(n) > len(PREFIX) + 4}
    for tag in sorted(tags):
        owner = OWNERS / tag
        try:
            pid = int(owner.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = 0
        if pid and _alive(pid) and _is_owner(pid, tag):
            continue
        for name in [n for n in names if n.startswith(PREFIX + tag)]:
            for p in _run(["ip", "netns", "pids", name], check=False).split():
                try:
                    os.kill(int(p), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _delete_netns(name)
        _run(["ip", "link", "del", PREFIX + tag], check=False)
        owner.unlink(missing_ok=True)
        removed.append(tag)
    return removed


def _is_owner(pid: int, tag: str) -> bool:
    """The pid file names a process started at the time written beside it (not a reused pid)."""
    try:
        recorded = (OWNERS / tag).read_text().split()[1]
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19] == recorded
    except (OSError, IndexError):
        return False


def _delete_netns(name: str) -> None:
    # Killed processes leave their namespace a moment later: retry for a while.
    for _ in range(50):
        if subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30).returncode == 0:
            return
        if name not in _run(["ip", "netns", "list"], check=False):
            return
        time.sleep(0.1)


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill9(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(30)

    def terminate(self, grace: float = 15) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill9()


@dataclass
class Host:
    """One machine of the pool: a network namespace, a private mount namespace, an address."""

    name: str  # coordinator, s3, agent-0, ...
    netns: str
    address: str
    hub_port: str  # its cable's end at the switch (the hub namespace)
    holder: subprocess.Popen[bytes]
    tmpfs: Path | None = None  # the small disk under its state, when it has one

    def prefix(self, wd: Path = REPO) -> list[str]:
        """What to put before a command to run it on this host."""
        return [
            "nsenter",
            f"--net=/run/netns/{self.netns}",
            f"--mount=/proc/{self.holder.pid}/ns/mnt",
            f"--wd={wd}",
            "--",
        ]

    def seen(self, path: Path) -> Path:
        """`path` as this host sees it (its own tmpfs included), readable from here."""
        return Path(f"/proc/{self.holder.pid}/root") / path.relative_to("/")

    def nft(self, script: str) -> None:
        _run(["ip", "netns", "exec", self.netns, "nft", "-f", "-"], stdin=script)


@dataclass
class BedConfig:
    agents: int = 3
    gpus_per_agent: int = 2
    lease_timeout: float = 3.0
    heartbeat: float = 0.5
    coordinator_disk_mib: int = 256  # the tmpfs that holds the coordinator's state folder
    agent_disk_mib: int = 128  # the tmpfs under each agent's home (its work folder)
    coordinator_args: tuple[str, ...] = ()
    agent_args: tuple[str, ...] = ()


@dataclass
class ChaosBed:
    root: Path
    config: BedConfig = field(default_factory=BedConfig)
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    subnet: int = 0
    hosts: dict[str, Host] = field(default_factory=dict)
    coordinator: Proc | None = None
    agents: dict[str, Proc] = field(default_factory=dict)
    s3: SeaweedServer | None = None
    clock_offset: float = 0.0
    _hub: str = ""
    _cuts: set[tuple[str, str]] = field(default_factory=set)
    _filled: set[str] = field(default_factory=set)

    # ---- layout

    @property
    def client_address(self) -> str:
        return f"{SUBNET_PREFIX}.{self.subnet}.1"

    @property
    def coordinator_address(self) -> str:
        return f"{self.hosts['coordinator'].address}:{COORDINATOR_PORT}"

    @property
    def state_dir(self) -> Path:
        return self.root / "coordinator-state"

    @property
    def ca_file(self) -> Path:
        return self.hosts["coordinator"].seen(self.state_dir / "tls" / "ca.pem")

    @property
    def offset_file(self) -> Path:
        return self.root / "clock-offset"

    def agent_names(self) -> list[str]:
        return [f"agent-{k}" for k in range(self.config.agents)]

    def agent_home(self, name: str) -> Path:
        return self.root / name

    # ---- bring-up

    def start(self) -> ChaosBed:
        cleanup_stale()
        OWNERS.mkdir(parents=True, exist_ok=True)
        started = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
        (OWNERS / self.tag).write_text(f"{os.getpid()} {started}\n")
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._network()
            self._add_host("coordinator", tmpfs=self.state_dir, size_mib=self.config.coordinator_disk_mib)
            self._add_host("s3")
            for name in self.agent_names():
                self._add_host(name, tmpfs=self.agent_home(name), size_mib=self.config.agent_disk_mib)
            s3 = self.hosts["s3"]
            self.s3 = SeaweedServer(self.root / "weed", host=s3.address, prefix=tuple(s3.prefix()))
            self.s3.start(timeout=60)
            self.offset_file.write_text("0\n")
            self.start_coordinator()
            for name in self.agent_names():
                self.start_agent(name)
            self.wait_agents_online(timeout=120)
        except BaseException:
            self.close()
            raise
        return self

    def _network(self) -> None:
        used = _run(["ip", "-4", "-o", "addr", "show"])
        free = [s for s in range(1, 255) if f" {SUBNET_PREFIX}.{s}." not in used]
        if not free:
            raise BedError(f"every {SUBNET_PREFIX}.S.0/24 is in use on this host")
        self.subnet = random.choice(free)
        self._hub = f"{PREFIX}{self.tag}h"
        _run(["ip", "netns", "add", self._hub])
        _run(["ip", "-n", self._hub, "link", "set", "lo", "up"])
        _run(["ip", "-n", self._hub, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self._hub, "link", "set", "br0", "up"])
        root_if = PREFIX + self.tag
        _run(["ip", "link", "add", root_if, "type", "veth", "peer", "name", "up0", "netns", self._hub])
        _run(["ip", "-n", self._hub, "link", "set", "up0", "master", "br0", "up"])
        _run(["ip", "addr", "add", f"{self.client_address}/24", "dev", root_if])
        _run(["ip", "link", "set", root_if, "up"])

    def _add_host(self, name: str, tmpfs: Path | None = None, size_mib: int = 0) -> Host:
        k = len(self.hosts)
        netns = f"{PREFIX}{self.tag}{k}"
        address = f"{SUBNET_PREFIX}.{self.subnet}.{k + 2}"
        port = f"p{k}"
        _run(["ip", "netns", "add", netns])
        _run(["ip", "-n", netns, "link", "set", "lo", "up"])
        _run(["ip", "-n", self._hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns])
        _run(["ip", "-n", self._hub, "link", "set", port, "master", "br0", "up"])
        _run(["ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0"])
        _run(["ip", "-n", netns, "link", "set", "eth0", "up"])
        # Drops of a `cut` (a partition between two hosts): a set of peers this host no longer hears.
        _run(
            ["ip", "netns", "exec", netns, "nft", "-f", "-"],
            stdin="table inet chaos {\n set cut { type ipv4_addr; }\n"
            " chain in { type filter hook input priority 0; ip saddr @cut drop; }\n"
            " chain out { type filter hook output priority 0; ip daddr @cut drop; }\n}\n",
        )
        holder = subprocess.Popen(
            ["ip", "netns", "exec", netns, "unshare", "--mount", "--propagation", "private", "sleep", "infinity"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        own = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 30
        while True:  # until the holder is `sleep` in a mount namespace of its own
            try:
                ready = (
                    Path(f"/proc/{holder.pid}/cmdline").read_bytes().startswith(b"sleep")
                    and os.readlink(f"/proc/{holder.pid}/ns/mnt") != own
                )
            except OSError:
                ready = False
            if ready:
                break
            if holder.poll() is not None or time.monotonic() > deadline:
                raise BedError(f"the mount namespace of host {name} did not start (exit {holder.poll()})")
            time.sleep(0.02)
        host = Host(name, netns, address, port, holder)
        self.hosts[name] = host
        if tmpfs is not None:
            tmpfs.mkdir(parents=True, exist_ok=True)
            _run(
                [
                    "nsenter",
                    f"--mount=/proc/{holder.pid}/ns/mnt",
                    "--",
                    "mount",
                    "-t",
                    "tmpfs",
                    "-o",
                    f"size={size_mib}m,mode=0755",
                    f"chaos-{self.tag}-{name}",
                    str(tmpfs),
                ]
            )
            host.tmpfs = tmpfs
        return host

    # ---- processes

    def _popen(self, host: Host, argv: list[str], log_name: str, env: dict[str, str]) -> Proc:
        log = self.root / "logs" / log_name
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as f:
            popen = subprocess.Popen(
                [*host.prefix(), *argv], stdout=f, stderr=f, stdin=subprocess.DEVNULL, env=env, cwd=REPO
            )
        return Proc(popen, log)

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DSTACK_"))}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
        return env

    def start_coordinator(self) -> Proc:
        assert self.s3 is not None
        env = {
            **self._base_env(),
            **self.s3.env(),
            "DSTACK_ADMIN_TOKEN": ADMIN_TOKEN,
            "DSTACK_JOIN_TOKEN": JOIN_TOKEN,
            "DSTACK_TEST_WALL_OFFSET_FILE": str(self.offset_file),
        }
        argv = [
            PY,
            "-m",
            "dstack.coordinator",
            "--state-dir",
            str(self.state_dir),
            "--listen",
            self.coordinator_address,
            "--storage",
            "s3://dstack/chaos",
            "--lease-timeout",
            str(self.config.lease_timeout),
            "--heartbeat-interval",
            str(self.config.heartbeat),
            # One user submits every job of a scenario: the per-user limits would measure themselves.
            "--max-queued-per-user",
            "0",
            "--max-submissions-per-minute",
            "0",
            *self.config.coordinator_args,
        ]
        self.coordinator = self._popen(self.hosts["coordinator"], argv, "coordinator.log", env)
        self.wait_coordinator()
        return self.coordinator

    def wait_coordinator(self, timeout: float = 300) -> None:
        # Generous: a restart under chaos at load 80 outgrew 90 s (bench.chaos mixed, issue 16); a coordinator
        # that exited ends the wait at once (_wait), so only a live, slow one is waited for this long.
        def answers() -> bool:
            if not self.ca_file.exists():
                return False
            try:
                with self.client(timeout=3) as c:
                    c.runs.list()
                return True
            except Exception:
                return False

        _wait(answers, timeout, "the coordinator to answer", self.coordinator)

    def start_agent(self, name: str) -> Proc:
        env = {**self._base_env(), "DSTACK_JOIN_TOKEN": JOIN_TOKEN, "DSTACK_LOG_LEVEL": "INFO"}
        host = self.hosts[name]
        argv = [
            PY,
            "-m",
            "dstack.agent",
            "--coordinator",
            self.coordinator_address,
            "--home",
            str(self.agent_home(name)),
            "--name",
            name,
            "--runtime",
            "host",
            "--job-user",
            "none",
            "--stop-grace",
            "2",
            "--advertise-address",
            host.address,
            "--ca-file",
            str(self.root / "ca.pem"),
            *(["--simulate-gpus", f"{self.config.gpus_per_agent}xA100-80GB"] if self.config.gpus_per_agent else []),
            *self.config.agent_args,
        ]
        # The agent reads the CA from a file of the client's disk (the coordinator's is on its tmpfs).
        publish(self.ca_file, self.root / "ca.pem")
        self.agents[name] = self._popen(host, argv, f"{name}.log", env)
        return self.agents[name]

    def client(self, timeout: float = 30.0) -> Client:
        publish(self.ca_file, self.root / "ca.pem")
        return Client(
            address=self.coordinator_address, token=ADMIN_TOKEN, ca_file=self.root / "ca.pem", timeout=timeout
        )

    def agent_statuses(self) -> dict[str, str]:
        with self.client(timeout=10) as c:
            return {a.name: a.status for a in c._channel.list_agents()}

    def wait_agents_online(self, timeout: float = 120, names: Sequence[str] | None = None) -> float:
        """Seconds until every agent (or those named) is online."""
        t0 = time.monotonic()
        wanted = list(names or self.agent_names())

        def online() -> bool:
            try:
                statuses = self.agent_statuses()
            except Exception:
                return False
            return all(statuses.get(n) == "online" for n in wanted)

        _wait(online, timeout, f"agents {wanted} online")
        return time.monotonic() - t0

    # ---- faults

    def kill9(self, name: str) -> None:
        """SIGKILL to a host's main process: `coordinator`, `s3` (weed) or an agent's name."""
        if name == "coordinator":
            assert self.coordinator is not None
            self.coordinator.kill9()
        elif name == "s3":
            assert self.s3 is not None
            self.s3.kill()
        else:
            self.agents[name].kill9()

    def restart(self, name: str) -> None:
        if name == "coordinator":
            self.start_coordinator()
        elif name == "s3":
            assert self.s3 is not None
            self.s3.start(timeout=60)
        else:
            self.start_agent(name)

    def hold_coordinator_port(self) -> Proc:
        """A process on the coordinator's host that listens on its address and answers nothing: a coordinator
        back and listening that does not answer hellos yet (starting, or starved). Connections are accepted,
        so an agent's probe sees no refusal. Stop it (`terminate`) before the coordinator starts again."""
        host, port = self.coordinator_address.rsplit(":", 1)
        script = (
            "import socket, sys, time\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"s.bind(({host!r}, {int(port)})); s.listen(128); print('listening', flush=True)\n"
            "while True: time.sleep(60)\n"
        )
        proc = self._popen(self.hosts["coordinator"], [PY, "-c", script], "silent-coordinator.log", {})
        _wait(lambda: "listening" in proc.log.read_text(errors="replace"), 60, "the silent listener", proc)
        return proc

    def isolate(self, name: str, down: bool = True) -> None:
        """The host's cable at the switch goes down (or up again): its packets are dropped silently."""
        host = self.hosts[name]
        _run(["ip", "-n", self._hub, "link", "set", host.hub_port, "down" if down else "up"])

    def cut(self, a: str, b: str, cut: bool = True) -> None:
        """A partition between two hosts only: each drops the other's packets (or no longer does)."""
        ha, hb = self.hosts[a], self.hosts[b]
        verb = "add" if cut else "delete"
        for here, there in ((ha, hb), (hb, ha)):
            here.nft(f"{verb} element inet chaos cut {{ {there.address} }}\n")
        if cut:
            self._cuts.add((a, b))
        else:
            self._cuts.discard((a, b))

    def step_clock(self, seconds: float) -> None:
        """The coordinator's wall clock steps by `seconds` (coordinator/clock.py re-reads within 0.5 s)."""
        self.clock_offset += seconds
        self.offset_file.write_text(f"{self.clock_offset}\n")

    def fill_disk(self, name: str) -> int:
        """Fills the host's tmpfs to its last byte; returns the bytes written."""
        host = self.hosts[name]
        if host.tmpfs is None:
            raise BedError(f"host {name} has no disk of its own to fill")
        path = host.seen(host.tmpfs / FILLER)
        written = 0
        chunk = b"\0" * (1 << 20)
        with open(path, "ab", buffering=0) as f:
            while True:
                try:
                    written += f.write(chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    # The last partial MiB: a byte at a time would be slow, halve instead.
                    size = len(chunk) // 2
                    if size < 512:
                        break
                    chunk = chunk[:size]
        self._filled.add(name)
        return written

    def free_disk(self, name: str) -> None:
        host = self.hosts[name]
        assert host.tmpfs is not None
        host.seen(host.tmpfs / FILLER).unlink(missing_ok=True)
        self._filled.discard(name)

    def heal_all(self) -> None:
        """Every fault undone: links up, cuts healed, disks freed, the coordinator's clock true again,
        processes that are down restarted."""
        if self.clock_offset:
            self.step_clock(-self.clock_offset)
        for name in self.hosts:
            self.isolate(name, down=False)
        for a, b in list(self._cuts):
            self.cut(a, b, cut=False)
        for name in list(self._filled):
            self.free_disk(name)
        if self.s3 is not None and (self.s3.proc is None or self.s3.proc.poll() is not None):
            self.s3.start(timeout=60)
        if self.coordinator is None or not self.coordinator.alive():
            self.start_coordinator()
        for name, proc in list(self.agents.items()):
            if not proc.alive():
                self.start_agent(name)

    def log_sizes(self) -> dict[str, int]:
        """Bytes in each process's log now (agents, coordinator; every life appends): where a scenario run on
        a bed that earlier ones used starts reading its own evidence."""
        out = {}
        for log in (self.root / "logs").glob("*.log"):
            try:
                out[log.stem] = log.stat().st_size
            except OSError:
                pass
        return out

    # ---- teardown

    def close(self) -> None:
        """Stops every process, deletes the namespaces (tmpfs and veths go with them). Idempotent."""
        for proc in [*self.agents.values(), *([self.coordinator] if self.coordinator else [])]:
            proc.kill9()
        if self.s3 is not None:
            self.s3.kill()
        for host in self.hosts.values():
            if host.holder.poll() is None:
                host.holder.kill()
            host.holder.wait(30)
        # Jobs of host-runtime agents may outlive their agent: whatever is left in a namespace goes.
        for name in [h.netns for h in self.hosts.values()] + ([self._hub] if self._hub else []):
            for p in _run(["ip", "netns", "pids", name], check=False).split():
                try:
                    os.kill(int(p), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _delete_netns(name)
        _run(["ip", "link", "del", PREFIX + self.tag], check=False)
        self.hosts.clear()
        self._hub = ""
        (OWNERS / self.tag).unlink(missing_ok=True)


def publish(source: Path, target: Path) -> None:
    """`target` becomes a copy of `source`, atomically, and is left alone when it already is one. Agents
    read the CA copy as they start, while the bed starts the next one and clients are made: rewriting it
    in place (truncate, then write) let an agent read it empty under load and exit ("no PEM certificate"),
    and the scenario failed waiting for it to come online."""
    data = source.read_bytes()
    try:
        if target.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def _wait(predicate: Callable[[], bool], timeout: float, what: str, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and not proc.alive():
            tail = proc.log.read_text(errors="replace")[-3000:] if proc.log.exists() else ""
            raise BedError(f"{what}: the process exited with {proc.popen.returncode}\n{tail}")
        if time.monotonic() > deadline:
            raise BedError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)
