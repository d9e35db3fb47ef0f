"""Who may call what: one gRPC interceptor authenticates every call against one permission table.

Each RPC needs one role (`PERMISSIONS`):
- `user`: `authorization: Bearer USER_TOKEN` (what `dstack config` stores);
- `agent`: `authorization: Bearer AGENT_TOKEN` (what Register handed the agent);
- `admin`: a user token whose user has the role 'admin' (enrolment: join tokens, removing and
  approving agents); another user's token is refused with PERMISSION_DENIED;
- `join`: `authorization: Bearer JOIN_TOKEN`, a join token that is not revoked, expired or used up
  (Register, which takes one use; coordinator/store/join_tokens.py). The request's `join_token` field
  is not read: agents still fill it in for coordinators older than this check;
- `public`: anyone.
A method missing from the table is refused. A refused call gets a handler that aborts without
reading the request, so an unauthenticated upload is not buffered: HTTP/2 flow control stops its
sender. The caller reaches handlers through `caller()` (a contextvar the interceptor sets; grpc.aio
runs interceptors and the handler in one contextvars.Context).
"""

from __future__ import annotations

import contextvars
import enum
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from dstack.coordinator.errors import Unauthenticated
from dstack.coordinator.lifecycle.agents import AgentStatus
from dstack.coordinator.store import Store
from dstack.coordinator.store.executor import DbExecutor
from dstack.protos.refusals import agent_removed


class Role(enum.Enum):
    PUBLIC = "public"
    JOIN = "join"
    USER = "user"
    ADMIN = "admin"
    AGENT = "agent"


_C = "/dstack.v1.ClientService/"
_A = "/dstack.v1.AgentService/"

# Every RPC of every service, once. tests/unit/test_auth.py checks this against the descriptors.
PERMISSIONS: dict[str, Role] = {
    _C + "GetInfo": Role.USER,  # answers with the caller's name: `dstack config` checks the token with it
    _C + "HasCode": Role.USER,
    _C + "PutCode": Role.USER,
    _C + "SubmitRun": Role.USER,
    _C + "GetRun": Role.USER,
    _C + "ListRuns": Role.USER,
    _C + "StopRun": Role.USER,
    _C + "StreamLogs": Role.USER,
    _C + "ListArtifacts": Role.USER,
    _C + "DownloadArtifact": Role.USER,
    _C + "ListAgents": Role.USER,
    _C + "AddTag": Role.USER,
    _C + "ListTags": Role.USER,
    _C + "DeleteTag": Role.USER,
    _C + "GetTag": Role.USER,
    _C + "AddSecret": Role.USER,
    _C + "ListSecrets": Role.USER,
    _C + "DeleteSecret": Role.USER,
    _C + "CreateUpload": Role.USER,
    _C + "PutArtifact": Role.USER,
    _C + "CommitUpload": Role.USER,
    _C + "DeleteRun": Role.USER,
    # The handler checks the role again, from the database at once (coordinator/app/users.py).
    _C + "SetUserLimits": Role.ADMIN,
    _C + "CreateJoinToken": Role.ADMIN,
    _C + "ListJoinTokens": Role.ADMIN,
    _C + "RevokeJoinToken": Role.ADMIN,
    _C + "RemoveAgent": Role.ADMIN,
    _C + "ApproveAgent": Role.ADMIN,
    _C + "PreemptRun": Role.ADMIN,
    _A + "Register": Role.JOIN,
    _A + "Connect": Role.AGENT,
    _A + "GetCode": Role.AGENT,
    _A + "UploadArtifact": Role.AGENT,
    _A + "CommitArtifacts": Role.AGENT,
    _A + "DownloadArtifact": Role.AGENT,
    _A + "GrantCode": Role.AGENT,
    _A + "GrantUploads": Role.AGENT,
    _A + "GrantDownloads": Role.AGENT,
}

TOKEN_CACHE_S = 30.0
MISSING_USER_TOKEN = "missing token: run `dstack config` with the coordinator's address and your token"
INVALID_USER_TOKEN = "invalid token: check `dstack config`"
MISSING_AGENT_TOKEN = "missing agent token: register the agent with the join token first"
UNKNOWN_AGENT_TOKEN = "unknown agent token: register the agent again with the join token"
INVALID_JOIN_TOKEN = "invalid join token"
NOT_ADMIN = "needs an admin token"
ADMIN_ROLE = "admin"  # users.role (the store's `ensure_user(..., "admin")`)


@dataclass(frozen=True)
class Caller:
    role: Role
    name: str = ""  # the user's name, the agent's id, or the join token's id; empty for public calls


_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("dstack_caller")


def caller() -> Caller:
    """The authenticated caller of the current RPC (set by `AuthInterceptor`)."""
    try:
        return _CALLER.get()
    except LookupError:
        raise RuntimeError("no caller: the handler runs outside AuthInterceptor") from None


def user_name() -> str:
    c = caller()
    assert c.role in (Role.USER, Role.ADMIN), c
    return c.name


def join_token_id() -> str:
    c = caller()
    assert c.role is Role.JOIN, c
    return c.name


def agent_id() -> str:
    c = caller()
    assert c.role is Role.AGENT, c
    return c.name


_NEEDS = {
    Role.PUBLIC: "nothing",
    Role.JOIN: "the join token",
    Role.USER: "a user token",
    Role.ADMIN: "an admin token",
    Role.AGENT: "an agent token",
}


MISSING_JOIN_TOKEN = (
    "invalid join token: none in the call's metadata (an agent sends it as `authorization: Bearer <join token>`;"
    " upgrade an agent older than the coordinator)"
)


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Authenticator:
    """Token -> caller, against the store. User tokens are cached briefly (every call checks one);
    agent and join tokens are not: a removed agent or a revoked join token is refused at once."""

    def __init__(self, store: Store, db: DbExecutor) -> None:
        self.store = store
        self.db = db
        self._users: dict[str, tuple[tuple[str, str], float]] = {}

    async def user_with_role(self, token: str) -> tuple[str, str] | None:
        # A revoked token stops working within TOKEN_CACHE_S.
        now = time.monotonic()
        hit = self._users.get(token)
        if hit is not None and hit[1] > now:
            return hit[0]
        found = await self.db(self.store.user_with_role, token)
        if found is not None:
            if len(self._users) > 10_000:
                self._users.clear()
            self._users[token] = (found, now + TOKEN_CACHE_S)
        return found

    async def user(self, token: str) -> str | None:
        found = await self.user_with_role(token)
        return None if found is None else found[0]

    async def agent(self, token: str) -> str | None:
        """The agent's id; Refused if the token was an agent's that an admin removed."""
        row = await self.db(self.store.agent_by_token, token)
        if row is None:
            return None
        if row.status == AgentStatus.REMOVED:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, agent_removed(row.name))
        return str(row.id)

    async def check(self, role: Role, token: str | None) -> Caller:
        """The caller for `role`, or Refused saying what is missing."""
        if role is Role.PUBLIC:
            return Caller(role)
        if role is Role.JOIN:
            if token is None:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, MISSING_JOIN_TOKEN)
            try:
                return Caller(role, await self.db(self.store.check_join_token, token))
            except Unauthenticated as e:  # unknown, revoked, expired or used up: the message says which
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, str(e)) from None
        if role is Role.ADMIN:
            if token is None:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, MISSING_USER_TOKEN)
            found = await self.user_with_role(token)
            if found is None:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, INVALID_USER_TOKEN)
            if found[1] != ADMIN_ROLE:
                raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"user {found[0]} is not an admin")
            return Caller(role, found[0])
        if role is Role.USER:
            if token is None:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, MISSING_USER_TOKEN)
            name = await self.user(token)
            if name is not None:
                return Caller(role, name)
            if await self.agent(token) is not None:
                raise Refused(grpc.StatusCode.PERMISSION_DENIED, "this call needs a user token, not an agent's")
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, INVALID_USER_TOKEN)
        if token is None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, MISSING_AGENT_TOKEN)
        agent = await self.agent(token)
        if agent is not None:
            return Caller(role, agent)
        if await self.user(token) is not None:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, "this call needs an agent token, not a user's")
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, UNKNOWN_AGENT_TOKEN)


def bearer_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return None


def refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that aborts without reading the request: its body is never buffered.

    Request-streaming whatever the method is: grpc.aio reads a unary request in full before the
    handler runs, while a streamed one is read only when the handler asks for it.
    """

    async def refuse(request_iterator: Any, context: Any) -> None:
        await context.abort(code, message)

    return grpc.stream_unary_rpc_method_handler(refuse)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, auth: Authenticator, permissions: dict[str, Role] = PERMISSIONS) -> None:
        self.auth = auth
        self.permissions = permissions

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        role = self.permissions.get(method)
        if role is None:
            return refusal(grpc.StatusCode.PERMISSION_DENIED, f"{method} is not in the coordinator's permission table")
        token = bearer_token(handler_call_details.invocation_metadata)
        try:
            who = await self.auth.check(role, token)
        except Refused as e:
            return refusal(e.code, f"{e} ({method.rsplit('/', 1)[-1]} needs {_NEEDS[role]})")
        except sqlite3.Error as e:  # the database could not answer: the caller may retry
            return refusal(grpc.StatusCode.UNAVAILABLE, f"cannot check the token: {e}")
        _CALLER.set(who)
        return await continuation(handler_call_details)
