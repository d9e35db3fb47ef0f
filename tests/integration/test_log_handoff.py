"""Followers of a job's log on real processes, with the coordinator handing stored chunks straight to
caught-up followers (coordinator/log_feed.py): a follower whose client stops reading falls back to the
database and still sees every line once, in order, beside one that keeps up; a follower without the right
to read gets nothing, and one whose user is removed gets none of the lines printed after."""

from __future__ import annotations

import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dstack.protos.v1 import client_pb2, client_pb2_grpc
from tests.conftest import PY, Cluster, free_port, wait_for, write_project

pytestmark = pytest.mark.integration

FIRST, SECOND, LAST = 1000, 30_000, 31_000  # the job prints 1..FIRST, FIRST+1..SECOND, SECOND+1..LAST
SCRAPE = "log-handoff-scrape-token"


# Prints FIRST..LAST in writes of 1,000 lines 5 ms apart: many chunks, each stored and handed on its own.
BURSTS = """
import sys, time
first, last = int(sys.argv[1]), int(sys.argv[2])
for start in range(first, last + 1, 1000):
    sys.stdout.write("".join(f"{i}\\n" for i in range(start, min(start + 1000, last + 1))))
    sys.stdout.flush()
    time.sleep(0.005)
"""


def phases(tmp: Path, second: int = SECOND, last: int = LAST) -> Path:
    return write_project(
        tmp / "p",
        f"""
        workflows:
          - name: phases
            provider: bash
            commands:
              - seq 1 {FIRST}
              - while [ ! -e {tmp / "gate1"} ]; do sleep 0.05; done
              - python3 bursts.py {FIRST + 1} {second}
              - while [ ! -e {tmp / "gate2"} ]; do sleep 0.05; done
              - seq {second + 1} {last}
        """,
        {"bursts.py": BURSTS},
    )


def start(cluster: Cluster, tmp: Path, *extra: str) -> int:
    port = free_port()
    (tmp / "scrape").write_text(SCRAPE + "\n")
    cluster.start_coordinator("--http-port", str(port), "--metrics-token-file", str(tmp / "scrape"), *extra)
    cluster.start_agent()
    return port


def metric(cluster: Cluster, port: int, name: str) -> float:
    ctx = ssl.create_default_context(cafile=str(cluster.ca_file))
    ctx.check_hostname = False
    req = urllib.request.Request(f"https://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {SCRAPE}"})
    with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
        body = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(body) for s in f.samples if s.name == name)


def submit(cluster: Cluster, project: Path, token: str | None = None) -> str:
    env = None if token is None else {**cluster.env(), "DSTACK_TOKEN": token}
    r = subprocess.run(
        [PY, "-m", "dstack.cli", "run", "-d", "phases"],
        cwd=project,
        env=env or cluster.env(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


class RawFollower:
    """`StreamLogs` with follow, read by hand: `lines` is every (seq, text) received, in order; reading
    stops while `paused` is clear. Flow control without BDP probing: a client that stops reading stops the
    coordinator's writes within 64 KiB, as a slow reader over a real network does."""

    def __init__(self, cluster: Cluster, run: str, token: str) -> None:
        self.channel = cluster.channel([("grpc.http2.bdp_probe", 0)])
        stub = client_pb2_grpc.ClientServiceStub(self.channel)
        req = client_pb2.StreamLogsRequest(run_name=run, follow=True, blocks=True)
        self.call = stub.StreamLogs(req, metadata=[("authorization", f"Bearer {token}")])
        self.lines: list[tuple[int, str]] = []
        self.error: grpc.RpcError | None = None
        self.reading = threading.Event()
        self.reading.set()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for resp in self.call:
                for jl in resp.jobs:
                    self.lines += [(ln.seq, ln.text) for ln in jl.lines]
                    for b in jl.blocks:
                        self.lines += [(b.first_seq + i, t) for i, t in enumerate(b.text.split("\n"))]
                self.reading.wait()
        except grpc.RpcError as e:
            self.error = e

    def has(self, seq: int) -> bool:
        return bool(self.lines) and self.lines[-1][0] >= seq

    def close(self) -> None:
        self.reading.set()
        self.call.cancel()
        self.thread.join(30)
        self.channel.close()


@pytest.fixture
def followers() -> Iterator[list[RawFollower]]:
    made: list[RawFollower] = []
    yield made
    for f in made:
        f.close()


def test_a_follower_that_falls_behind_catches_up_with_every_line_once_beside_one_that_keeps_up(
    cluster: Cluster, tmp_path: Path, followers: list[RawFollower]
) -> None:
    """Attack: a client that stops reading while the job prints ~40 times its hand-off buffer (4 KiB here),
    then reads again; another follows with the real CLI throughout."""
    port = start(cluster, tmp_path, "--log-follow-buffer", "4096")
    run = submit(cluster, phases(tmp_path))
    slow = RawFollower(cluster, run, cluster.admin_token)
    followers.append(slow)
    out = tmp_path / "cli.out"
    with out.open("w") as f:
        cli = subprocess.Popen([PY, "-m", "dstack.cli", "logs", "-f", run], stdout=f, env=cluster.env())
    try:
        wait_for(lambda: slow.has(FIRST), 120, what="the slow follower caught up")
        wait_for(lambda: out.read_text().endswith(f"\n{FIRST}\n"), 120, what="the CLI caught up")
        slow.reading.clear()  # its client stops reading
        (tmp_path / "gate1").touch()
        wait_for(lambda: out.read_text().endswith(f"\n{SECOND}\n"), 120, what="the CLI's second phase")
        wait_for(lambda: metric(cluster, port, "dstack_log_follower_overflows_total") >= 1, 60, what="an overflow")
        assert not slow.has(SECOND)
        slow.reading.set()
        wait_for(lambda: slow.has(SECOND), 120, what="the slow follower caught up again")
        (tmp_path / "gate2").touch()
        assert cli.wait(120) == 0
        slow.thread.join(120)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    expected = [(i, str(i)) for i in range(1, LAST + 1)]
    assert slow.error is None and slow.lines == expected
    assert out.read_text().splitlines() == [str(i) for i in range(1, LAST + 1)]
    assert metric(cluster, port, "dstack_log_chunks_handed_off_total") >= 1  # the CLI's, while caught up


def test_a_follower_without_the_right_gets_nothing_and_a_removed_one_nothing_printed_after(
    cluster: Cluster, tmp_path: Path, followers: list[RawFollower]
) -> None:
    """Attacks: following with a made-up token, and with a token whose user is removed while its stream is
    caught up (chunks are then handed to it, not read for it): neither may see a line printed after."""
    start(cluster, tmp_path)
    r = cluster.cli("users", "add", "eve", "--role", "viewer")
    assert r.returncode == 0, r.stderr
    eve = r.stdout.splitlines()[1]
    run = submit(cluster, phases(tmp_path, 2 * FIRST, 3 * FIRST))
    forged = RawFollower(cluster, run, "not-a-token")
    removed = RawFollower(cluster, run, eve)
    followers += [forged, removed]
    wait_for(lambda: removed.has(FIRST), 120, what="eve's follower caught up")
    assert cluster.cli("users", "remove", "eve").returncode == 0
    (tmp_path / "gate1").touch()
    (tmp_path / "gate2").touch()
    cluster.wait_status(run, {"done"}, timeout=120)
    removed.thread.join(60)
    forged.thread.join(60)
    assert forged.lines == [] and forged.error is not None
    assert forged.error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert removed.error is not None and removed.error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert removed.lines == [(i, str(i)) for i in range(1, FIRST + 1)]
