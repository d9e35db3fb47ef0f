"""`dstack logs -f` resumes a broken stream from its cursor: every line once, no gap."""

from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path

import pytest

from tests.conftest import PY, Cluster, wait_for, write_project

pytestmark = pytest.mark.integration

HALF = 10_000


class CuttingProxy:
    """A TCP proxy that resets each of its first `cuts` connections once it has forwarded
    `cut_after` bytes towards the client: the connection drops in the middle of a stream."""

    def __init__(self, upstream: str, cut_after: int, cuts: int) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.cut_after = cut_after
        self.cuts_left = cuts
        self.cut = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                limit = self.cut_after if self.cuts_left > 0 else None
                self.cuts_left -= limit is not None
            up = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, up, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, client, limit), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(16384):
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[: limit - sent])
                    with self.lock:
                        self.cut += 1
                    for s in (src, dst):  # dropped, as by a broken link
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                        # shutdown, not just close: the other direction's thread is blocked in recv on
                        # this socket, and only shutdown ends the connection under it.
                        s.shutdown(socket.SHUT_RDWR)
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for s in (src, dst):
            s.close()

    def close(self) -> None:
        self.server.close()


def test_logs_follow_resumes_after_the_connection_drops(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    gate = tmp_path / "gate"
    project = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: talk
            provider: bash
            commands:
              - seq 1 {HALF}
              - while [ ! -e {gate} ]; do sleep 0.05; done
              - seq {HALF + 1} {2 * HALF}
        """,
    )
    r = cluster.cli("run", "-d", "talk", cwd=project)
    assert r.returncode == 0, r.stderr
    name = r.stdout.strip()
    proxy = CuttingProxy(cluster.address, cut_after=30_000, cuts=3)
    out, err = tmp_path / "logs.out", tmp_path / "logs.err"
    try:
        with out.open("w") as f, err.open("w") as e:
            logs = subprocess.Popen(
                [PY, "-m", "dstack.cli", "logs", "-f", name],
                stdout=f,
                stderr=e,
                env={**cluster.env(), "DSTACK_COORDINATOR": proxy.address},
            )
        # The second half starts once the first has been printed: the stream is followed live.
        wait_for(
            lambda: logs.poll() is not None or out.read_text().endswith(f"\n{HALF}\n"),
            timeout=120,
            what="the first half",
        )
        assert logs.poll() is None, err.read_text()
        gate.touch()
        logs.wait(timeout=120)
    finally:
        proxy.close()
        if logs.poll() is None:
            logs.kill()
    assert logs.returncode == 0, err.read_text()
    assert proxy.cut == 3, "the connection was not cut"
    assert out.read_text().splitlines() == [str(i) for i in range(1, 2 * HALF + 1)]
