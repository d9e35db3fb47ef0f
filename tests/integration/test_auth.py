"""Calls are authenticated before their body is read: a 60 MiB unauthenticated request (a user's
SubmitRun, an agent's Register) is refused on its metadata alone, and the coordinator never holds the 60 MiB."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dstack.protos.v1 import agent_pb2, client_pb2
from tests.conftest import Cluster

BIG = 60 << 20
MIB = 1 << 20


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes: a buffered body would raise it for good."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc")


LIMITS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
RAW = {"request_serializer": None, "response_deserializer": None}


def channel(cluster: Cluster) -> grpc.Channel:
    return cluster.channel(LIMITS)


def big_body(method: str, join_token: str) -> bytes:
    """A well-formed request, so that the only reason to refuse it is the token's absence from the metadata."""
    if method == "Register":  # the right join token in the body: only the metadata counts
        name = "x" * BIG
        return agent_pb2.RegisterRequest(join_token=join_token, name=name).SerializeToString()
    return client_pb2.SubmitRunRequest(workflow="big", args=["x" * BIG]).SerializeToString()


BIG_CALLS = {"SubmitRun": "/dstack.v1.ClientService/SubmitRun", "Register": "/dstack.v1.AgentService/Register"}
REFUSALS = {
    ("SubmitRun", False): "missing token: run `dstack config`",
    ("SubmitRun", True): "invalid token",
    ("Register", False): "invalid join token: none in the call's metadata",
    ("Register", True): "invalid join token",
}


@pytest.mark.parametrize("method", list(BIG_CALLS))
@pytest.mark.parametrize("metadata", [None, [("authorization", "Bearer wrong")]], ids=["no-token", "wrong-token"])
def test_big_unauthenticated_request_is_refused_unread(
    cluster: Cluster, metadata: list[tuple[str, str]] | None, method: str
) -> None:
    coordinator = cluster.start_coordinator()
    pid = coordinator.popen.pid
    with channel(cluster) as ch:
        body = big_body(method, cluster.join_token)
        submit = ch.unary_unary(BIG_CALLS[method], **RAW)
        for _ in range(2):  # warm-up, so the peak before is that of a serving coordinator
            with pytest.raises(grpc.RpcError):
                submit(b"", metadata=metadata, timeout=30)
        before = peak_rss(pid)
        with pytest.raises(grpc.RpcError) as e:
            submit(body, metadata=metadata, timeout=60)
        grown = peak_rss(pid) - before
    print(f"refused; the coordinator's peak RSS grew by {grown / MIB:.1f} MiB")
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value
    assert REFUSALS[method, metadata is not None] in (e.value.details() or "")
    assert grown < 20 * MIB, f"the coordinator's peak RSS grew by {grown / MIB:.1f} MiB"


def test_unauthenticated_upload_stops_its_sender(cluster: Cluster) -> None:
    """Flow control: the refused stream is never read, so the client cannot push the whole upload."""
    coordinator = cluster.start_coordinator()
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(BIG // MIB):
            sent += MIB
            yield client_pb2.PutCodeRequest(hash="0" * 64, data=b"\0" * MIB).SerializeToString()

    before = peak_rss(coordinator.popen.pid)
    with channel(cluster) as ch:
        put = ch.stream_unary("/dstack.v1.ClientService/PutCode", **RAW)
        with pytest.raises(grpc.RpcError) as e:
            put(chunks(), timeout=60)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value
    print(f"refused after the client had handed over {sent // MIB} of {BIG // MIB} MiB")
    assert sent < BIG, "the whole upload was sent"
    assert peak_rss(coordinator.popen.pid) - before < 20 * MIB


def test_agent_token_is_not_a_user_token(cluster: Cluster) -> None:
    cluster.start_coordinator()
    with channel(cluster) as ch:
        info = ch.unary_unary("/dstack.v1.ClientService/GetInfo", **RAW)
        with pytest.raises(grpc.RpcError) as e:
            info(b"", metadata=[("authorization", f"Bearer {cluster.join_token}")], timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        get_code = ch.stream_stream("/dstack.v1.AgentService/GetCode", **RAW)
        with pytest.raises(grpc.RpcError) as e:
            list(get_code(iter([b""]), metadata=[("authorization", f"Bearer {cluster.admin_token}")], timeout=30))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "needs an agent token" in (e.value.details() or "")


def test_register_needs_the_join_token(cluster: Cluster) -> None:
    cluster.start_coordinator()
    with channel(cluster) as ch:
        register = ch.unary_unary("/dstack.v1.AgentService/Register", **RAW)
        with pytest.raises(grpc.RpcError) as e:
            register(agent_pb2.RegisterRequest(join_token="wrong", name="x").SerializeToString(), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "invalid join token" in (e.value.details() or "")
        body = agent_pb2.RegisterRequest(join_token=cluster.join_token, name="x").SerializeToString()
        with pytest.raises(grpc.RpcError) as e:  # the right token in the body only: the metadata is what counts
            register(body, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "none in the call's metadata" in (e.value.details() or "")
        ok = agent_pb2.RegisterResponse.FromString(
            register(body, metadata=[("authorization", f"Bearer {cluster.join_token}")], timeout=30)
        )
        # The agent's own token now passes authentication for agent calls (and only for them): what it
        # may then touch is its own jobs' code, which a random hash is not (coordinator/app/agent_scope.py).
        grant = ch.unary_unary("/dstack.v1.AgentService/GrantCode", **RAW)
        with pytest.raises(grpc.RpcError) as e:
            grant(
                agent_pb2.GetCodeRequest(hash="0" * 64).SerializeToString(),
                metadata=[("authorization", f"Bearer {ok.agent_token}")],
                timeout=30,
            )
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not the code of a job running on this agent" in (e.value.details() or "")
        info = ch.unary_unary("/dstack.v1.ClientService/GetInfo", **RAW)
        with pytest.raises(grpc.RpcError) as e:
            info(b"", metadata=[("authorization", f"Bearer {ok.agent_token}")], timeout=30)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "needs a user token" in (e.value.details() or "")


def test_register_with_the_join_token_in_metadata(cluster: Cluster) -> None:
    """The join token comes as `authorization` metadata: the body is never needed to refuse."""
    cluster.start_coordinator()
    body = agent_pb2.RegisterRequest(name="y").SerializeToString()
    with channel(cluster) as ch:
        register = ch.unary_unary("/dstack.v1.AgentService/Register", **RAW)
        ok = agent_pb2.RegisterResponse.FromString(
            register(body, metadata=[("authorization", f"Bearer {cluster.join_token}")], timeout=30)
        )
        assert ok.agent_token
        with pytest.raises(grpc.RpcError) as e:
            register(body, metadata=[("authorization", "Bearer wrong")], timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
