"""Who may call what: one gRPC interceptor authenticates every call against one permission table.

Each RPC needs one role (`PERMISSIONS`):
- `user`: any user's token, `authorization: Bearer USER_TOKEN` (what `dstack config` stores): a
  viewer, member or admin. Reading: every listing and log is visible to the whole team;
- `member`: a member's or an admin's token: submitting runs, and changing runs, tags and personal
  secrets (the use cases in coordinator/app/ then check that the caller owns what it changes, or
  is an admin: coordinator/app/ownership.py);
- `admin`: an admin's token: users, enrolment (join tokens, removing and approving agents);
  a viewer's or member's token is refused with PERMISSION_DENIED naming the role it needs;
- `agent`: `authorization: Bearer AGENT_TOKEN` (what Register handed the agent);
- `join`: `authorization: Bearer JOIN_TOKEN`, a join token that is not revoked, expired or used up
  (Register, which takes one use; coordinator/store/join_tokens.py). The request's `join_token` field
  is not read: agents still fill it in for coordinators older than this check;
- `public`: anyone.
A method missing from the table is refused. A refused call gets a handler that aborts without
reading the request, so an unauthenticated upload is not buffered: HTTP/2 flow control stops its
sender. The caller reaches handlers through `caller()` (a contextvar the interceptor sets; grpc.aio
runs interceptors and the handler in one contextvars.Context).

User tokens are cached, but every hit is checked against the store's `users.generation`, which
every removal, rotation and role change bumps (there is one coordinator process): a revoked token
is refused on the very next call. The cache's time limit only bounds how long an edit made outside
the coordinator (sqlite3 on the database file) can go unseen.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from dstack.coordinator.errors import Unauthenticated
from dstack.coordinator.lifecycle.agents import AgentStatus
from dstack.coordinator.store import Store
from dstack.coordinator.store.executor import DbExecutor
from dstack.coordinator.store.reader import ReadExecutor
from dstack.coordinator.store.users import ADMIN, MEMBER, VIEWER, hash_token
from dstack.protos.refusals import agent_removed


class Role(enum.Enum):
    PUBLIC = "public"
    JOIN = "join"
    USER = "user"  # any user: viewer, member or admin
    MEMBER = "member"  # a member or an admin
    ADMIN = "admin"
    AGENT = "agent"


# A user may make a call when their role's rank is at least the call's.
_RANK = {VIEWER: 0, MEMBER: 1, ADMIN: 2}
_NEEDED_RANK = {Role.USER: 0, Role.MEMBER: 1, Role.ADMIN: 2}
USER_ROLES = (Role.USER, Role.MEMBER, Role.ADMIN)


_C = "/dstack.v1.ClientService/"
_A = "/dstack.v1.AgentService/"

# Every RPC of every service, once. tests/unit/test_auth.py checks this against the descriptors.
PERMISSIONS: dict[str, Role] = {
    _C + "GetInfo": Role.USER,  # answers with the caller's name and role: `dstack config` and `whoami`
    _C + "HasCode": Role.MEMBER,  # code is uploaded to submit a run
    _C + "PutCode": Role.MEMBER,
    _C + "SubmitRun": Role.MEMBER,
    _C + "SubmitRuns": Role.MEMBER,
    _C + "GetRun": Role.USER,
    _C + "GetRunRecord": Role.USER,  # runs are readable by the team; so are their records and code
    _C + "DownloadRunCode": Role.USER,
    # And reading the old run (every user may) and submitting in its repository (app/rerun.py).
    _C + "RerunRun": Role.MEMBER,
    _C + "ListRuns": Role.USER,
    _C + "StopRun": Role.MEMBER,  # and the run's owner or an admin (app/runs.py)
    _C + "StreamLogs": Role.USER,
    _C + "ListArtifacts": Role.USER,
    _C + "DownloadArtifact": Role.USER,
    _C + "ListAgents": Role.USER,
    _C + "AddTag": Role.MEMBER,  # and the tagged run's owner or an admin (app/tags.py)
    _C + "ListTags": Role.USER,
    _C + "DeleteTag": Role.MEMBER,  # and the tagged run's owner or an admin (app/tags.py)
    _C + "GetTag": Role.USER,
    _C + "AddSecret": Role.MEMBER,  # a team secret: an admin (app/secrets.py)
    _C + "ListSecrets": Role.USER,
    _C + "DeleteSecret": Role.MEMBER,  # a team secret: an admin (app/secrets.py)
    _C + "CreateUpload": Role.MEMBER,  # an uploaded artifact set is a run of the caller's
    _C + "PutArtifact": Role.MEMBER,  # and the upload's owner or an admin (app/artifacts.py)
    _C + "CommitUpload": Role.MEMBER,  # and the upload's owner or an admin (app/artifacts.py)
    _C + "DeleteRun": Role.MEMBER,  # and the run's owner or an admin (app/runs.py)
    # The handler checks the role again, from the database at once (coordinator/app/users.py).
    _C + "SetUserLimits": Role.ADMIN,
    _C + "CreateJoinToken": Role.ADMIN,
    _C + "ListJoinTokens": Role.ADMIN,
    _C + "RevokeJoinToken": Role.ADMIN,
    _C + "RemoveAgent": Role.ADMIN,
    _C + "ApproveAgent": Role.ADMIN,
    _C + "PreemptRun": Role.ADMIN,
    _C + "AddUser": Role.ADMIN,
    _C + "ListUsers": Role.USER,  # names and roles: who the owners in `dstack ps` are
    _C + "RemoveUser": Role.ADMIN,
    _C + "RotateUserToken": Role.USER,  # one's own token; another user's: admins only (app/users.rotate)
    # A tunnel into a job runs code as its owner: the run's owner or an admin only (app/tunnels.py).
    _C + "Tunnel": Role.MEMBER,
    _A + "Register": Role.JOIN,
    _A + "Connect": Role.AGENT,
    _A + "GetCode": Role.AGENT,
    _A + "UploadArtifact": Role.AGENT,
    _A + "CommitArtifacts": Role.AGENT,
    _A + "DownloadArtifact": Role.AGENT,
    _A + "GrantCode": Role.AGENT,
    _A + "GrantUploads": Role.AGENT,
    _A + "GrantDownloads": Role.AGENT,
    _A + "Tunnel": Role.AGENT,  # only a tunnel asked of this agent (coordinator/tunnel_registry.py)
}

# The standard gRPC services served beside ours (coordinator/server.py). Health is public: a load
# balancer probes it without a token, and Check and Watch say only SERVING or NOT_SERVING. Reflection needs a user's
# token: it reveals only the schema (public in the source), but nothing is offered to strangers that
# they do not need (`grpcurl -H "authorization: Bearer $TOKEN" ... list`).
STANDARD_PERMISSIONS: dict[str, Role] = {
    "/grpc.health.v1.Health/Check": Role.PUBLIC,
    "/grpc.health.v1.Health/Watch": Role.PUBLIC,
    "/grpc.health.v1.Health/List": Role.USER,  # names every service, as reflection does
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Role.USER,
}
ALL_PERMISSIONS: dict[str, Role] = {**PERMISSIONS, **STANDARD_PERMISSIONS}

TOKEN_CACHE_S = 30.0
MISSING_USER_TOKEN = "missing token: run `dstack config` with the coordinator's address and your token"
INVALID_USER_TOKEN = "invalid token: check `dstack config`"
MISSING_AGENT_TOKEN = "missing agent token: register the agent with the join token first"
UNKNOWN_AGENT_TOKEN = "unknown agent token: register the agent again with the join token"
INVALID_JOIN_TOKEN = "invalid join token"
LAST_SEEN_EVERY_NS = 60 * 10**9  # users.last_seen_at is written at most this often per user


@dataclass(frozen=True)
class Caller:
    role: Role  # what the RPC needed
    name: str = ""  # the user's name, the agent's id, or the join token's id; empty for public calls
    user_role: str = ""  # a user's own role (admin, member, viewer); empty for agents and join tokens
    token_hash: str = field(default="", repr=False)  # a user's: a long stream re-checks it (app/users.py)


_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("dstack_caller")


def caller() -> Caller:
    """The authenticated caller of the current RPC (set by `AuthInterceptor`)."""
    try:
        return _CALLER.get()
    except LookupError:
        raise RuntimeError("no caller: the handler runs outside AuthInterceptor") from None


def user_name() -> str:
    c = caller()
    assert c.role in USER_ROLES, c
    return c.name


def user_caller() -> Caller:
    """The calling user, with their role (for the use cases' ownership checks)."""
    c = caller()
    assert c.role in USER_ROLES, c
    return c


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
    Role.MEMBER: "a user token (a member's or an admin's)",
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


class RoleRefused(Refused):
    """A valid user token whose role is below the RPC's: the message names both."""

    def __init__(self, needed: Role, user: str, user_role: str) -> None:
        super().__init__(grpc.StatusCode.PERMISSION_DENIED, f"needs the {needed.value} role")
        self.needed, self.user, self.user_role = needed, user, user_role

    def message(self, method: str) -> str:
        a = "an" if self.user_role[:1] in "aeiou" else "a"
        return f"{method} needs the {self.needed.value} role; you are {a} {self.user_role} (user {self.user})"


def _user_with_role(store: Store, token: str) -> tuple[str, str] | None:
    return store.user_with_role(token)


class Authenticator:
    """Token -> caller, against the store. User tokens are cached (every call checks one), each entry
    valid while the store's users.generation is unchanged: a removal or rotation is in force for the
    very next call. Agent and join tokens are not cached: a removed agent or a revoked join token is
    refused at once."""

    def __init__(self, store: Store, db: DbExecutor, reads: ReadExecutor | None = None) -> None:
        self.store = store
        self.db = db
        # A token looked up on a reader thread: a call's authentication never waits behind a scheduling
        # pass on the DB thread (coordinator/store/reader.py); the writer's when there are none.
        self.reads = reads
        self._touching: set[asyncio.Task[None]] = set()
        # token -> ((name, role, token hash), users.generation when looked up, monotonic expiry)
        self._users: dict[str, tuple[tuple[str, str, str], int, float]] = {}
        self._seen: dict[str, int] = {}  # user -> when last_seen_at was last written (ns)

    def _generation(self) -> int:
        return self.store.users.generation

    async def _user(self, token: str) -> tuple[str, str, str] | None:
        now = time.monotonic()
        generation = self._generation()
        hit = self._users.get(token)
        if hit is not None and hit[1] == generation and hit[2] > now:
            return hit[0]
        if self.reads is not None:
            found = await self.reads(_user_with_role, token)
        else:
            found = await self.db(self.store.user_with_role, token)
        if found is None:
            self._users.pop(token, None)
            return None
        user = (found[0], found[1], hash_token(token))
        # Not cached if the users changed while it was looked up: the answer may predate the change.
        if self._generation() == generation:
            if len(self._users) > 10_000:
                self._users.clear()
            self._users[token] = (user, generation, now + TOKEN_CACHE_S)
        self._touch(user[0])
        return user

    def _touch(self, name: str) -> None:
        # `dstack users list` shows when each user was last seen: one write a minute per user, at most,
        # not waited for (the call it came with must not queue behind a scheduling pass for it).
        now = self.store.clock()
        if now - self._seen.get(name, 0) < LAST_SEEN_EVERY_NS:
            return
        self._seen[name] = now
        task = asyncio.create_task(self._write_seen(name, now), name=f"last seen {name}")
        self._touching.add(task)
        task.add_done_callback(self._touching.discard)

    async def _write_seen(self, name: str, now: int) -> None:
        try:
            await self.db(self.store.touch_user, name, now)
        except sqlite3.Error:
            pass  # last seen is a courtesy: never refuse a call over it

    async def user(self, token: str) -> str | None:
        found = await self._user(token)
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
        if role in USER_ROLES:
            if token is None:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, MISSING_USER_TOKEN)
            found = await self._user(token)
            if found is None:
                if await self.agent(token) is not None:
                    raise Refused(grpc.StatusCode.PERMISSION_DENIED, "this call needs a user token, not an agent's")
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, INVALID_USER_TOKEN)
            name, user_role, token_hash = found
            if _RANK[user_role] < _NEEDED_RANK[role]:
                raise RoleRefused(role, name, user_role)
            return Caller(role, name, user_role, token_hash)
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
    def __init__(self, auth: Authenticator, permissions: dict[str, Role] = ALL_PERMISSIONS) -> None:
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
        except RoleRefused as e:
            return refusal(e.code, e.message(method.rsplit("/", 1)[-1]))
        except Refused as e:
            return refusal(e.code, f"{e} ({method.rsplit('/', 1)[-1]} needs {_NEEDS[role]})")
        except sqlite3.Error as e:  # the database could not answer: the caller may retry
            return refusal(grpc.StatusCode.UNAVAILABLE, f"cannot check the token: {e}")
        _CALLER.set(who)
        return await continuation(handler_call_details)
