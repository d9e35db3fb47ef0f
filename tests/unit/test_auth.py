"""The permission table covers every RPC, and the interceptor refuses before a handler runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from dstack.coordinator.auth import (
    ALL_PERMISSIONS,
    PERMISSIONS,
    STANDARD_PERMISSIONS,
    Authenticator,
    AuthInterceptor,
    Role,
    bearer_token,
)
from dstack.coordinator.store import Store
from dstack.coordinator.store.executor import DbExecutor
from dstack.protos.v1 import agent_pb2, client_pb2


def test_every_method_of_every_service_is_in_the_table() -> None:
    methods = {
        f"/{service.full_name}/{m.name}"
        for file in (client_pb2.DESCRIPTOR, agent_pb2.DESCRIPTOR)
        for service in file.services_by_name.values()
        for m in service.methods
    }
    assert methods == set(PERMISSIONS), methods ^ set(PERMISSIONS)


def test_standard_services_are_in_the_table_health_alone_public() -> None:
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    methods = {
        f"/{service.full_name}/{m.name}"
        for file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
        for service in file.services_by_name.values()
        for m in service.methods
    }
    assert methods == set(STANDARD_PERMISSIONS), methods ^ set(STANDARD_PERMISSIONS)
    public = {m for m, role in ALL_PERMISSIONS.items() if role is Role.PUBLIC}
    assert public == {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}


ADMIN_ONLY = {
    "PreemptRun",
    "SetUserLimits",
    "CreateJoinToken",
    "ListJoinTokens",
    "RevokeJoinToken",
    "RemoveAgent",
    "ApproveAgent",
    "AddUser",
    "RemoveUser",
}
# Calls that change something: a viewer's token is refused (and the use case checks ownership).
MEMBER_ONLY = {
    "HasCode",
    "PutCode",
    "SubmitRun",
    "RerunRun",  # submits a run: from the old run's record (app/rerun.py)
    "StopRun",
    "DeleteRun",
    "AddTag",
    "DeleteTag",
    "AddSecret",
    "DeleteSecret",
    "CreateUpload",
    "PutArtifact",
    "CommitUpload",
    "Tunnel",  # a tunnel into a job runs code as its owner: the owner or an admin (app/tunnels.py)
}


def test_agent_calls_need_an_agent_and_client_calls_a_user_of_a_role() -> None:
    for method, role in PERMISSIONS.items():
        name = method.rsplit("/", 1)[1]
        if method.startswith("/dstack.v1.ClientService/"):
            expected = Role.ADMIN if name in ADMIN_ONLY else Role.MEMBER if name in MEMBER_ONLY else Role.USER
            assert role is expected, method
        elif method != "/dstack.v1.AgentService/Register":
            assert role is Role.AGENT, method
    assert PERMISSIONS["/dstack.v1.AgentService/Register"] is Role.JOIN


def test_bearer_token() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token(None) is None


def test_servicers_only_translate() -> None:
    """No servicer authenticates by hand or reaches past coordinator/app into the engine or store."""
    services = Path(__file__).resolve().parents[2] / "coordinator" / "services"
    for path in services.glob("*.py"):
        text = path.read_text()
        for word in ("engine", ".store", ".db(", "bearer_token", "invocation_metadata", "authenticate("):
            assert word not in text, f"{path.name} uses {word!r}"


class FakeContext:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise RuntimeError("aborted")


class Details:
    def __init__(self, method: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.method = method
        self.invocation_metadata = metadata


def refused_with(handler: grpc.RpcMethodHandler) -> tuple[grpc.StatusCode, str] | None:
    """Runs a refusal handler; it must not read its request stream."""

    async def never_read() -> AsyncIterator[bytes]:
        raise AssertionError("the request was read")
        yield b""  # pragma: no cover

    async def run() -> tuple[grpc.StatusCode, str] | None:
        ctx = FakeContext()
        assert handler.request_streaming and handler.stream_unary is not None
        with pytest.raises(RuntimeError):
            await handler.stream_unary(never_read(), ctx)
        return ctx.aborted

    return asyncio.run(run())


@pytest.fixture
def authenticator(tmp_path: Path) -> Iterator[Authenticator]:
    """A real one on an empty store (the refusals under test come before any look-up)."""
    store = Store(tmp_path / "db.sqlite")
    db = DbExecutor(store)
    try:
        store.ensure_default_join_token("join")
        yield Authenticator(store, db)
    finally:
        db.shutdown()
        store.close()


def test_a_method_missing_from_the_table_is_refused_unread(authenticator: Authenticator) -> None:
    async def continuation(details: object) -> grpc.RpcMethodHandler:
        raise AssertionError("a refused call must not reach its handler")

    interceptor = AuthInterceptor(authenticator, permissions={})
    handler = asyncio.run(interceptor.intercept_service(continuation, Details("/dstack.v1.ClientService/GetRun")))
    aborted = refused_with(handler)
    assert aborted is not None and aborted[0] == grpc.StatusCode.PERMISSION_DENIED
    assert "not in the coordinator's permission table" in aborted[1]


def test_a_call_without_a_token_is_refused_unread_saying_what_is_missing(authenticator: Authenticator) -> None:
    async def continuation(details: object) -> grpc.RpcMethodHandler:
        raise AssertionError("a refused call must not reach its handler")

    interceptor = AuthInterceptor(authenticator)
    handler = asyncio.run(interceptor.intercept_service(continuation, Details("/dstack.v1.ClientService/SubmitRun")))
    aborted = refused_with(handler)
    assert aborted is not None and aborted[0] == grpc.StatusCode.UNAUTHENTICATED
    assert "missing token: run `dstack config`" in aborted[1] and "SubmitRun needs a user token" in aborted[1]


def test_a_register_without_the_join_token_in_metadata_is_refused_unread(authenticator: Authenticator) -> None:
    """Its body (which may carry a `join_token` field) is never read: the metadata alone decides."""

    async def continuation(details: object) -> grpc.RpcMethodHandler:
        raise AssertionError("a refused call must not reach its handler")

    interceptor = AuthInterceptor(authenticator)
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        details = Details("/dstack.v1.AgentService/Register", metadata)
        aborted = refused_with(asyncio.run(interceptor.intercept_service(continuation, details)))
        assert aborted is not None and aborted[0] == grpc.StatusCode.UNAUTHENTICATED
        assert "invalid join token" in aborted[1] and "Register needs the join token" in aborted[1]


def refusal_for(authenticator: Authenticator, method: str, token: str) -> tuple[grpc.StatusCode, str] | None:
    async def continuation(details: object) -> grpc.RpcMethodHandler:
        raise AssertionError("a refused call must not reach its handler")

    interceptor = AuthInterceptor(authenticator)
    details = Details(f"/dstack.v1.ClientService/{method}", (("authorization", f"Bearer {token}"),))
    return refused_with(asyncio.run(interceptor.intercept_service(continuation, details)))


def test_admin_calls_need_an_admin(authenticator: Authenticator) -> None:
    """A member's token is a user's, not an admin's: refused unread, saying which role it needs."""
    authenticator.store.ensure_user("alice", "alice-token", "member")
    for method in sorted(ADMIN_ONLY):
        aborted = refusal_for(authenticator, method, "alice-token")
        assert aborted is not None and aborted[0] == grpc.StatusCode.PERMISSION_DENIED, method
        assert aborted[1] == f"{method} needs the admin role; you are a member (user alice)"


def test_calls_that_change_something_need_a_member(authenticator: Authenticator) -> None:
    authenticator.store.ensure_user("vera", "vera-token", "viewer")
    for method in sorted(MEMBER_ONLY | ADMIN_ONLY):
        aborted = refusal_for(authenticator, method, "vera-token")
        assert aborted is not None and aborted[0] == grpc.StatusCode.PERMISSION_DENIED, method
        needed = "admin" if method in ADMIN_ONLY else "member"
        assert aborted[1] == f"{method} needs the {needed} role; you are a viewer (user vera)"


def test_a_removed_or_rotated_token_is_refused_on_the_very_next_call(authenticator: Authenticator) -> None:
    """The cache is checked against the store's users generation: no time window."""
    store = authenticator.store

    async def scenario() -> None:
        bob, token = await authenticator.db(store.add_user, "bob", "member")
        assert bob.role == "member"
        assert await authenticator.user(token) == "bob"  # cached now
        assert await authenticator.user(token) == "bob"  # from the cache
        _, token2 = await authenticator.db(store.rotate_user_token, "bob")
        assert token2 != token
        assert await authenticator.user(token) is None  # the cached entry is stale at once
        assert await authenticator.user(token2) == "bob"
        await authenticator.db(store.remove_user, "bob")
        assert await authenticator.user(token2) is None

    asyncio.run(scenario())
