"""Port tunnels (docs/tunnels.md): throughput and round-trip latency through `dstack port-forward`,
against a direct loopback connection and `ssh -L` to the same job's ports, in the same run.

A host job serves two ports: `source` (read an 8-byte length, send that many bytes), `sink` (read
until EOF, answer the byte count) and `echo` (echo every read). Each round measures every path in a
rotating order: MB/s down (source) and up (sink), and the round trip of one byte (echo, TCP_NODELAY
everywhere). Figures are medians over the rounds; the added latency is the path's median round trip
minus the direct one's. `ssh -L` needs an sshd binary (Debian: `apt-get install openssh-server`); it
runs as this user on a free port with throwaway keys; without one that path is skipped and said so.
Usage: python -m bench.tunnel [ROUNDS] [MIB]
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

from bench._harness import Services, free_port, meta
from dstack.protos.v1 import client_pb2, common_pb2

SERVER = r"""
import socket, struct, sys, threading
def serve(port, handle):
    s = socket.create_server(("127.0.0.1", port))
    while True:
        c, _ = s.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handle, args=(c,), daemon=True).start()
def source(c):
    n = struct.unpack("!Q", c.recv(8, socket.MSG_WAITALL))[0]
    block = b"x" * (1 << 20)
    while n:
        k = min(n, len(block)); c.sendall(block[:k]); n -= k
    c.close()
def sink(c):
    n = 0
    while chunk := c.recv(1 << 20):
        n += len(chunk)
    c.sendall(struct.pack("!Q", n)); c.close()
def echo(c):
    while chunk := c.recv(1 << 16):
        c.sendall(chunk)
    c.close()
src, snk, ech = map(int, sys.argv[1:4])
threading.Thread(target=serve, args=(snk, sink), daemon=True).start()
threading.Thread(target=serve, args=(ech, echo), daemon=True).start()
print("serving", flush=True)
serve(src, source)
"""

PINGS = 2000


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def down_mbps(port: int, size: int) -> float:
    with connect(port) as s:
        t0 = time.perf_counter()
        s.sendall(struct.pack("!Q", size))
        got = 0
        while chunk := s.recv(1 << 20):
            got += len(chunk)
        dt = time.perf_counter() - t0
    assert got == size, (got, size)
    return size / dt / 1e6


def up_mbps(port: int, size: int) -> float:
    block = b"y" * (1 << 20)
    with connect(port) as s:
        t0 = time.perf_counter()
        left = size
        while left:
            k = min(left, len(block))
            s.sendall(block[:k])
            left -= k
        s.shutdown(socket.SHUT_WR)
        answer = s.recv(8, socket.MSG_WAITALL)
        dt = time.perf_counter() - t0
    assert struct.unpack("!Q", answer)[0] == size
    return size / dt / 1e6


def rtt_s(port: int) -> float:
    """The median round trip of one byte over one connection."""
    with connect(port) as s:
        for _ in range(50):  # warm up
            s.sendall(b"p")
            s.recv(1)
        times = []
        for _ in range(PINGS):
            t0 = time.perf_counter()
            s.sendall(b"p")
            s.recv(1)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process for port {port} exited ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answers on {port}")


def start_sshd(tmp: Path, targets: list[int]) -> tuple[list[subprocess.Popen[bytes]], dict[int, int]] | str:
    """sshd on a free port with throwaway keys and one `ssh -N -L` per target: (processes, target -> local)."""
    sshd = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd",) if os.path.exists(p)), None)
    if sshd is None or shutil.which("ssh") is None:
        return "no sshd on this machine (Debian: apt-get install openssh-server)"
    d = tmp / "ssh"
    d.mkdir(mode=0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "user")], check=True)
    (d / "authorized_keys").write_text((d / "user.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation directory
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PasswordAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
        f"PidFile {d / 'sshd.pid'}\n"
    )
    procs = [subprocess.Popen([sshd, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.DEVNULL)]
    wait_port(port, procs[0])
    user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    local = {}
    for target in targets:
        lp = free_port()
        argv = ["ssh", "-N", "-p", str(port), "-i", str(d / "user"), "-o", "StrictHostKeyChecking=no", "-o"]
        argv += [f"UserKnownHostsFile={d / 'known_hosts'}", "-o", "BatchMode=yes"]
        argv += ["-L", f"127.0.0.1:{lp}:127.0.0.1:{target}", f"{user}@127.0.0.1"]
        procs.append(subprocess.Popen(argv, stderr=subprocess.DEVNULL))
        wait_port(lp, procs[-1])
        local[target] = lp
    return procs, local


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    size = (int(sys.argv[2]) if len(sys.argv) > 2 else 256) << 20
    svc = Services()
    extra: list[subprocess.Popen[bytes]] = []
    try:
        svc.start_coordinator()
        svc.start_agent("bench", "--runtime", "host", "--job-user", "none")
        svc.wait_agents(1)
        src, snk, ech = free_port(), free_port(), free_port()
        (svc.tmp / "server.py").write_text(SERVER)
        job = common_pb2.JobSpec(
            job_name="serve",
            workflow="serve",
            provider="bash",
            commands=[f"python3 {svc.tmp / 'server.py'} {src} {snk} {ech}"],
            ports=[common_pb2.PortSpec(container_port=p, host_port=p) for p in (src, snk, ech)],
        )
        stub = svc.client_stub()
        run = stub.SubmitRun(client_pb2.SubmitRunRequest(workflow="serve", jobs=[job]), metadata=meta()).run
        for p in (src, snk, ech):
            wait_port(p)
        env = {**os.environ, **svc.cli_env(), "DSTACK_HOME": str(svc.tmp / "cli-home")}
        paths: dict[str, dict[int, int]] = {"direct": {p: p for p in (src, snk, ech)}, "tunnel": {}}
        for p in (src, snk, ech):
            lp = free_port()
            fwd = subprocess.Popen(
                [sys.executable, "-m", "dstack.cli", "port-forward", run.name, f"{lp}:{p}"],
                env=env,
                stderr=subprocess.PIPE,
            )
            extra.append(fwd)
            assert fwd.stderr is not None
            line = fwd.stderr.readline().decode()
            if not re.search(r"forwarding", line):
                raise RuntimeError(f"port-forward: {line}")
            paths["tunnel"][p] = lp
        ssh = start_sshd(svc.tmp, [src, snk, ech])
        if isinstance(ssh, str):
            print(f"ssh -L: skipped: {ssh}")
        else:
            extra += ssh[0]
            paths["ssh -L"] = ssh[1]

        figures: dict[str, dict[str, list[float]]] = {name: {"down": [], "up": [], "rtt": []} for name in paths}
        names = list(paths)
        for r in range(rounds + 1):  # round 0 warms every path up and is not counted
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                ports = paths[name]
                values = {
                    "down": down_mbps(ports[src], size),
                    "up": up_mbps(ports[snk], size),
                    "rtt": rtt_s(ports[ech]),
                }
                for key, value in values.items():
                    if r:
                        figures[name][key].append(value)
        base_rtt = statistics.median(figures["direct"]["rtt"])
        print(f"{rounds} rounds, {size >> 20} MiB each way, {PINGS} one-byte round trips; medians")
        print(f"{'path':<8} {'down MB/s':>10} {'up MB/s':>10} {'rtt ms':>8} {'added ms':>9}")
        for name, f in figures.items():
            rtt = statistics.median(f["rtt"])
            print(
                f"{name:<8} {statistics.median(f['down']):>10.0f} {statistics.median(f['up']):>10.0f}"
                f" {rtt * 1e3:>8.3f} {(rtt - base_rtt) * 1e3:>9.3f}"
            )
        if "ssh -L" in figures:
            for key in ("down", "up"):
                ratio = statistics.median(figures["tunnel"][key]) / statistics.median(figures["ssh -L"][key])
                print(f"tunnel / ssh -L throughput, {key}: {ratio:.0%} (target >= 50%)")
        added = (statistics.median(figures["tunnel"]["rtt"]) - base_rtt) * 1e3
        print(f"tunnel: {added:.2f} ms added per round trip (target <= 2 ms)")
    finally:
        for proc in extra:
            if proc.poll() is None:
                proc.terminate()
        for proc in extra:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        svc.stop()


if __name__ == "__main__":
    main()
