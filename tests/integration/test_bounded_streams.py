"""Long-lived calls under attack, against a real coordinator (TLS, HTTP API) and agent: a member opening
streams beyond `--max-streams-per-user` (followed logs over gRPC and SSE, tunnels) is refused with a
message naming the limit while another member still gets in, and all users together stop at
`--max-streams`; a stream gives its place back however it ends; a follower that never reads is dropped
after `--stream-stall-timeout` with a clear end, and the coordinator's memory stays bounded meanwhile.

`dstack_streams_open` (/metrics) is the coordinator's own count: each way of ending must bring it back."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dstack.protos.v1 import client_pb2, client_pb2_grpc, common_pb2
from tests.conftest import Cluster, free_port, wait_for, write_project

pytestmark = pytest.mark.integration

PER_USER = 3
TOTAL = 7
STALL_S = 3
FLOOD_LINES, FLOOD_LINE_BYTES = 2000, 16_000  # 32 MB of log: far more than a connection's buffers hold


@dataclass
class Bed:
    cluster: Cluster
    http_port: int
    tokens: dict[str, str] = field(default_factory=dict)  # user -> token
    runs: dict[str, str] = field(default_factory=dict)  # workflow -> run name
    channel: grpc.Channel | None = None

    @property
    def stub(self) -> client_pb2_grpc.ClientServiceStub:
        assert self.channel is not None
        return client_pb2_grpc.ClientServiceStub(self.channel)

    def ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cluster.ca_file))

    def metrics(self) -> dict[str, float]:
        c = http.client.HTTPSConnection("127.0.0.1", self.http_port, context=self.ssl(), timeout=30)
        try:
            c.request("GET", "/metrics", headers={"Authorization": f"Bearer {self.cluster.admin_token}"})
            body = c.getresponse().read().decode()
        finally:
            c.close()
        return {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples}

    def open_streams(self) -> int:
        return int(self.metrics()["dstack_streams_open"])

    def settle(self, after: str = "") -> None:
        """Waits until no stream is open (the count comes back however the last one ended)."""
        what = "every stream given back" + (f" after {after}" if after else "")
        wait_for(lambda: self.open_streams() == 0, timeout=60, interval=0.2, what=what)


def meta(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def add_user(cluster: Cluster, name: str) -> str:
    r = cluster.cli("users", "add", name, "--role", "member")
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()[1]


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    tmp = tmp_path_factory.mktemp("streams")
    cluster = Cluster(tmp, free_port())
    b = Bed(cluster, free_port())
    try:
        cluster.start_coordinator(
            "--http-port",
            str(b.http_port),
            "--max-streams-per-user",
            str(PER_USER),
            "--max-streams",
            str(TOTAL),
            "--stream-stall-timeout",
            str(STALL_S),
        )
        cluster.start_agent()
        project = write_project(
            tmp / "p",
            f"""
            workflows:
              - name: sleepy
                provider: bash
                commands: ["echo started", "sleep 600"]
              - name: hello
                provider: bash
                commands: ["echo hello", "mkdir -p out && printf artifact > out/f.txt"]
                artifacts: [out]
              - name: flood
                provider: bash
                commands:
                  - python3 -c "l = 'x' * {FLOOD_LINE_BYTES}; [print(i, l) for i in range({FLOOD_LINES})]"
                  - echo flooded
                  - sleep 600
            """,
        )
        for w in ("sleepy", "hello"):
            r = cluster.cli("run", "-d", w, cwd=project)
            assert r.returncode == 0, r.stderr
            b.runs[w] = r.stdout.strip()
        cluster.wait_status(b.runs["sleepy"], {"running"}, timeout=120)
        cluster.wait_status(b.runs["hello"], {"done"}, timeout=120)
        b.runs["project"] = str(project)
        b.tokens = {name: add_user(cluster, name) for name in ("mia", "bob", "cleo", "dan", "eve")}
        b.channel = cluster.channel()
        yield b
    finally:
        if b.channel is not None:
            b.channel.close()
        cluster.stop_all()


# ---- ways to hold a stream open ----------------------------------------------------------------
@dataclass
class Held:
    close: Callable[[], None]


def follow_grpc(b: Bed, user: str, channel: grpc.Channel | None = None) -> tuple[Any, Held]:
    """A followed log over gRPC, established (its first message read)."""
    stub = client_pb2_grpc.ClientServiceStub(channel) if channel is not None else b.stub
    call = stub.StreamLogs(
        client_pb2.StreamLogsRequest(run_name=b.runs["sleepy"], follow=True), metadata=meta(b.tokens[user])
    )
    first = next(call)
    assert any(ln.text == "started" for j in first.jobs for ln in j.lines), first
    return call, Held(call.cancel)


def follow_sse(b: Bed, user: str, run: str = "") -> tuple[http.client.HTTPResponse, Held]:
    c = http.client.HTTPSConnection("127.0.0.1", b.http_port, context=b.ssl(), timeout=60)
    c.request(
        "GET",
        f"/api/runs/{run or b.runs['sleepy']}/logs",
        headers={"Authorization": f"Bearer {b.tokens[user]}", "Accept": "text/event-stream"},
    )
    return c.getresponse(), Held(c.close)


def open_tunnel(b: Bed, user: str) -> tuple[Any, Held]:
    """A tunnel whose client has not named its target yet (held open, as a port-forward being set up)."""
    gate = threading.Event()

    def frames() -> Iterator[common_pb2.TunnelFrame]:
        gate.wait()
        return
        yield

    call = b.stub.Tunnel(frames(), metadata=meta(b.tokens[user]))

    def close() -> None:
        call.cancel()
        gate.set()

    return call, Held(close)


def refused_grpc(b: Bed, user: str) -> grpc.RpcError:
    call = b.stub.StreamLogs(
        client_pb2.StreamLogsRequest(run_name=b.runs["sleepy"], follow=True), metadata=meta(b.tokens[user])
    )
    with pytest.raises(grpc.RpcError) as e:
        next(call)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
    return e.value


# ---- the limits -----------------------------------------------------------------------------------
def test_a_member_beyond_the_limit_is_refused_while_others_get_in(bed: Bed) -> None:
    bed.settle()
    held: list[Held] = []
    try:
        # mia: one stream of each kind, her limit.
        _, h = follow_grpc(bed, "mia")
        held.append(h)
        r, h = follow_sse(bed, "mia")
        held.append(h)
        assert r.status == 200
        _, h = open_tunnel(bed, "mia")
        held.append(h)
        wait_for(lambda: bed.open_streams() == 3, timeout=30, what="mia's three streams counted")
        # A fourth, of any kind, is refused with the limit, its option and what to do.
        e = refused_grpc(bed, "mia")
        assert e.details() == (
            f"following the logs of run {bed.runs['sleepy']} refused: user mia already has 3 streams open"
            " (followed logs, tunnels, downloads), the limit per user is 3 (dstack server --max-streams-per-user):"
            " close some, or ask an admin to raise it"
        )
        r, h = follow_sse(bed, "mia")
        body = json.loads(r.read())
        h.close()
        assert r.status == 429 and body["error"]["code"] == "resource_exhausted", body
        assert "--max-streams-per-user" in body["error"]["message"]
        t, h = open_tunnel(bed, "mia")
        with pytest.raises(grpc.RpcError) as te:
            next(t)
        h.close()
        assert te.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "a tunnel (dstack port-forward, attach) refused" in te.value.details()
        # Another member is not held back by mia's streams: bob gets his three.
        for _ in range(PER_USER):
            held.append(follow_grpc(bed, "bob")[1])
        held.append(follow_grpc(bed, "cleo")[1])  # 7: the coordinator's limit for all users
        e = refused_grpc(bed, "cleo")
        assert "the coordinator has 7 streams open, its limit for all users together" in e.details()
        assert "(dstack server --max-streams 7)" in e.details()
        # mia closes her tunnel: its place is free again, for anyone.
        held.pop(2).close()
        wait_for(lambda: bed.open_streams() == 6, timeout=30, what="the tunnel's place given back")
        held.append(follow_grpc(bed, "cleo")[1])
        assert bed.metrics()["dstack_streams_refused_total"] >= 4
    finally:
        for h in held:
            h.close()
    bed.settle()


def test_a_stream_gives_its_place_back_however_it_ends(bed: Bed) -> None:
    """Each way a stream can end, done more often than dan's limit: if any kept its place, dan would be
    refused (and the count would not come back to 0)."""
    own = bed.cluster.channel([("grpc.use_local_subchannel_pool", 1)])
    stub, dan = client_pb2_grpc.ClientServiceStub(own), meta(bed.tokens["dan"])
    hello = bed.runs["hello"]

    def grpc_cancel() -> None:
        follow_grpc(bed, "dan", own)[1].close()

    def grpc_disconnect() -> None:
        # A connection of its own (channels with the same target and options share one by default).
        ch = bed.cluster.channel([("grpc.use_local_subchannel_pool", 1)])
        follow_grpc(bed, "dan", ch)
        ch.close()  # the connection goes

    def grpc_run_ended() -> None:  # the coordinator ends it: the followed run is over
        last = list(stub.StreamLogs(client_pb2.StreamLogsRequest(run_name=hello, follow=True), metadata=dan))[-1]
        assert last.finished_run.name == hello

    def grpc_read_to_the_end() -> None:
        lines = list(stub.StreamLogs(client_pb2.StreamLogsRequest(run_name=hello), metadata=dan))
        assert any(ln.text == "hello" for m in lines for j in m.jobs for ln in j.lines)

    def grpc_error() -> None:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.StreamLogs(client_pb2.StreamLogsRequest(run_name="no-such-run", follow=True), metadata=dan))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND

    def download_done_and_missing() -> None:
        job = stub.GetRun(client_pb2.GetRunRequest(name=hello), metadata=dan).run.jobs[0].job_name
        req = client_pb2.DownloadArtifactRequest(run_name=hello, job_name=job, path="out/f.txt")
        assert b"".join(c.data for c in stub.DownloadArtifact(req, metadata=dan)) == b"artifact"
        req.path = "out/none.txt"
        with pytest.raises(grpc.RpcError) as e:
            list(stub.DownloadArtifact(req, metadata=dan))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND

    def tunnel_cancelled_and_refused() -> None:
        open_tunnel(bed, "dan")[1].close()
        bad = iter([common_pb2.TunnelFrame(open=common_pb2.TunnelTarget(run_name=hello, port=0))])
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Tunnel(bad, metadata=dan))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        gone = iter([common_pb2.TunnelFrame(open=common_pb2.TunnelTarget(run_name=hello, port=8080))])
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Tunnel(gone, metadata=dan))  # the run is over: refused after its place was taken
        assert e.value.code() != grpc.StatusCode.RESOURCE_EXHAUSTED

    def sse_disconnect() -> None:
        r, h = follow_sse(bed, "dan")
        assert r.status == 200
        r.readline()  # the first event has begun: the stream is established
        h.close()

    def sse_run_ended() -> None:
        r, h = follow_sse(bed, "dan", hello)
        assert b"event: end" in r.read()
        h.close()

    ways = [
        grpc_cancel,
        grpc_disconnect,
        grpc_run_ended,
        grpc_read_to_the_end,
        grpc_error,
        download_done_and_missing,
        tunnel_cancelled_and_refused,
        sse_disconnect,
        sse_run_ended,
    ]
    bed.settle()
    for way in ways:
        for _ in range(PER_USER + 1):
            way()
            # A disconnect is noticed within a second or so (HTTP: the stream checks its connection every
            # second), so each round waits for the count rather than racing the next open against it.
            bed.settle(way.__name__)
    # And dan still has all of his places.
    held = [follow_grpc(bed, "dan", own)[1] for _ in range(PER_USER)]
    for h in held:
        h.close()
    own.close()
    bed.settle()


# ---- a follower that never reads --------------------------------------------------------------------
def test_followers_that_never_read_are_dropped_and_memory_stays_bounded(bed: Bed) -> None:
    bed.settle()
    coordinator = psutil.Process(bed.cluster.coordinator.popen.pid)  # type: ignore[union-attr]
    rss_before = coordinator.memory_info().rss
    dropped_before = bed.metrics().get("dstack_streams_dropped_slow_total", 0.0)
    r = bed.cluster.cli("run", "-d", "flood", cwd=Path(bed.runs["project"]))
    assert r.returncode == 0, r.stderr
    flood = r.stdout.strip()
    eve = meta(bed.tokens["eve"])
    # gRPC: the call starts and its client never asks for a message (flow control holds the coordinator back).
    stalled = bed.stub.StreamLogs(client_pb2.StreamLogsRequest(run_name=flood, follow=True), metadata=eve)
    # SSE: a connection with a tiny receive buffer whose client never reads.
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(60)
    raw.connect(("127.0.0.1", bed.http_port))
    sse = bed.ssl().wrap_socket(raw, server_hostname="127.0.0.1")
    sse.sendall(
        f"GET /api/runs/{flood}/logs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {bed.tokens['eve']}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    peak = [rss_before]

    def both_dropped() -> bool:
        peak[0] = max(peak[0], coordinator.memory_info().rss)
        return bed.metrics().get("dstack_streams_dropped_slow_total", 0.0) >= dropped_before + 2

    try:
        wait_for(both_dropped, timeout=180, interval=0.5, what="both stalled followers dropped")
        # The SSE connection is closed: its place is free. The gRPC call keeps its place until its client
        # takes the status queued behind its unread messages (or goes): that bounds what gRPC still holds.
        wait_for(lambda: bed.open_streams() == 1, timeout=60, interval=0.2, what="the SSE follower's place back")
        # The gRPC client, reading at last, gets what was sent, then the reason its stream ended.
        got = 0
        with pytest.raises(grpc.RpcError) as e:
            for m in stalled:
                got += sum(len(j.lines) for j in m.jobs)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (
            f"following the logs of run {flood}: the coordinator ended this stream because its client took nothing"
            f" for {STALL_S} s while data waited (dstack server --stream-stall-timeout)"
        ) in e.value.details()
        assert 0 < got < FLOOD_LINES
        bed.settle("the gRPC client read its status")
        # The SSE client finds its connection cut (after what was in flight), without the run's end.
        received = b""
        try:
            while chunk := sse.recv(1 << 16):
                received += chunk
        except (ConnectionError, ssl.SSLError, TimeoutError):
            pass
        assert received.startswith(b"HTTP/1.1 200") and b"event: end" not in received
        # A follower that reads gets every line of the flood.
        texts: list[str] = []
        reader = bed.stub.StreamLogs(client_pb2.StreamLogsRequest(run_name=flood, follow=True), metadata=eve)
        for m in reader:
            texts += [ln.text for j in m.jobs for ln in j.lines]
            if "flooded" in texts[-3:]:
                break
        reader.cancel()
        assert [int(t.split()[0]) for t in texts if t.endswith("x")] == list(range(FLOOD_LINES))
    finally:
        stalled.cancel()
        sse.close()
        bed.cluster.cli("stop", flood)
    grown = (peak[0] - rss_before) >> 20
    print(f"coordinator RSS {rss_before >> 20} MiB before, peak {peak[0] >> 20} MiB (+{grown} MiB)")
    assert grown < 128, f"the coordinator grew by {grown} MiB while two followers did not read"
    bed.settle()
