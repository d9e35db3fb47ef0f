"""The JSON API: one table of endpoints, each with the gRPC method whose permission it shares, its
handler, and what the OpenAPI document says about it (openapi.py is built from this table, and
tests check it against the router's routes).

A route missing from the table does not exist (404): nothing is served that the table does not
authorize. Every handler calls the use cases in coordinator/app/, as the gRPC services do.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from dstack.coordinator.app import (
    agents,
    artifacts,
    join_tokens,
    logs,
    records,
    runs,
    secrets,
    tags,
    users,
    waiting,
)
from dstack.coordinator.app.core import Core
from dstack.coordinator.app.ownership import Actor
from dstack.coordinator.auth import Caller
from dstack.coordinator.errors import CoordinatorError
from dstack.coordinator.http.errors import bad_request
from dstack.coordinator.http.views import agent_json, line_json, queue_json, run_json
from dstack.coordinator.model import RunStatus
from dstack.coordinator.services.rpc import status_for
from dstack.coordinator.store import JoinTokenRow, RunFilters
from dstack.storage import StoreError

CORE = web.AppKey("core", Core)
VERSION = "0.1.0"
log = logging.getLogger("dstack.coordinator")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # "path", "query" or "header"
    description: str
    kind: str = "string"  # the JSON schema type
    repeated: bool = False


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    # The ClientService method whose role (coordinator/auth.py PERMISSIONS) this endpoint needs;
    # "" for a public one (the OpenAPI document).
    rpc: str
    handler: Handler
    summary: str
    params: tuple[Param, ...] = ()
    response: str = "application/json"  # or text/event-stream, text/plain
    extra_responses: dict[str, str] = field(default_factory=dict)


def caller_of(request: web.Request) -> Caller:
    who: Caller = request["caller"]
    return who


def actor_of(request: web.Request) -> Actor:
    who = caller_of(request)
    return Actor(who.name, who.user_role, who.token_hash)


# ---- cursors: opaque to clients, checked here ----------------------------------------------------
def _encode(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value, separators=(",", ":")).encode()).decode().rstrip("=")


def _decode(text: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, ValueError) as e:
        raise BadParam(f"invalid cursor {text[:40]!r}: pass back a cursor this API returned") from e


class BadParam(Exception):
    pass


def run_cursor(after: tuple[int, str]) -> str:
    return _encode([after[0], after[1]])


def parse_run_cursor(text: str) -> tuple[int, str]:
    v = _decode(text)
    if not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], str)):
        raise BadParam("invalid cursor: pass back a cursor this API returned")
    return v[0], v[1]


def log_cursor(cursor: dict[str, int]) -> str:
    return _encode(cursor)


def parse_log_cursor(text: str) -> dict[str, int]:
    if not text:
        return {}
    v = _decode(text)
    if not (isinstance(v, dict) and all(isinstance(k, str) and isinstance(s, int) for k, s in v.items())):
        raise BadParam("invalid cursor: pass back a cursor this API returned")
    return dict(v)


def _int(request: web.Request, name: str, default: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise BadParam(f"{name} must be an integer, not {text[:20]!r}") from None


def _statuses(values: list[str]) -> tuple[RunStatus, ...]:
    out = []
    for v in values:
        try:
            out.append(RunStatus[v.upper()])
        except KeyError:
            known = ", ".join(s.name.lower() for s in RunStatus if s.value)
            raise BadParam(f"unknown status {v[:30]!r}: one of {known}") from None
    return tuple(out)


# ---- handlers ------------------------------------------------------------------------------------
async def whoami(request: web.Request) -> web.StreamResponse:
    who = caller_of(request)
    core = request.app[CORE]
    return web.json_response(
        {"user": who.name, "role": who.user_role, "version": VERSION, "local_mode": core.local_mode}
    )


MAX_FILTER_VALUES = 100


def _values(request: web.Request, name: str) -> tuple[str, ...]:
    values = request.query.getall(name, [])
    if len(values) > MAX_FILTER_VALUES:
        raise BadParam(f"at most {MAX_FILTER_VALUES} values of {name}")
    return tuple(values)


async def list_runs(request: web.Request) -> web.StreamResponse:
    q = request.query
    filters = RunFilters(
        owners=_values(request, "owner"),
        workflows=_values(request, "workflow"),
        statuses=_statuses(list(_values(request, "status"))),
        repository=q.get("repository", ""),
    )
    after = parse_run_cursor(q["cursor"]) if q.get("cursor") else None
    page = await runs.page_runs(request.app[CORE], filters, _int(request, "limit", 100), after)
    return web.json_response(
        {
            "runs": [run_json(r) for r in page.runs],
            "next_cursor": None if page.next_after is None else run_cursor(page.next_after),
        }
    )


async def get_run(request: web.Request) -> web.StreamResponse:
    return web.json_response(run_json(await runs.get(request.app[CORE], request.match_info["name"])))


async def get_run_record(request: web.Request) -> web.StreamResponse:
    """The run's record (docs/reproducibility.md), the same document as `dstack show --json`."""
    found = await records.run_record(request.app[CORE], request.match_info["name"])
    return web.json_response(found.record)


async def run_logs(request: web.Request) -> web.StreamResponse:
    if "text/event-stream" in request.headers.get("Accept", ""):
        return await follow_logs(request)
    core = request.app[CORE]
    name = request.match_info["name"]
    after = parse_log_cursor(request.query.get("cursor", ""))
    stream = logs.stream_logs(core, name, follow=False, after=after, blocks=True)
    lines: list[dict[str, Any]] = []
    cursor = after
    try:
        async for chunk in stream:  # the first chunk only: at most logs.LOG_BATCH lines, 4 MiB
            lines = [line_json(j.job_name, ln) for j in chunk.jobs for ln in j.lines]
            cursor = chunk.cursor
            break
    finally:
        await stream.aclose()
    return web.json_response({"lines": lines, "cursor": log_cursor(cursor)})


KEEPALIVE_S = 15.0  # a comment line this often on a quiet stream: proxies keep it, the caller is re-checked
GONE_CHECK_S = 1.0  # how often a quiet stream checks that its client is still connected


class _Dropped(Exception):
    """The client went away, or took nothing for the stall timeout: the connection is closed."""


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _write(request: web.Request, response: web.StreamResponse, data: bytes, what: str) -> None:
    """Writes to a stream; a client that has taken nothing for the stall timeout (the write waits on a full
    send buffer all that while) is cut off: its unsent data would otherwise stay in the coordinator."""
    limits = request.app[CORE].streams
    try:
        async with asyncio.timeout(limits.stall_s):  # not wait_for: it may swallow a cancel (rpc.write_or_drop)
            await response.write(data)
    except TimeoutError:
        limits.dropped_slow += 1
        log.warning("%s: the client took nothing for %.0f s; connection closed", what, limits.stall_s)
        transport = request.transport
        if transport is not None:
            transport.abort()  # not close(): that would wait, forever, to send what the client does not read
        raise _Dropped from None
    except ConnectionError:  # the client went away mid-write
        raise _Dropped from None


async def _next_chunk(request: web.Request, chunks: asyncio.Queue[Any]) -> Any:
    """The next item, or TimeoutError after KEEPALIVE_S; _Dropped as soon as the client is gone
    (aiohttp does not cancel a handler whose client left: a quiet stream would hold its place until then)."""
    waited = 0.0
    while waited < KEEPALIVE_S:
        if _gone(request):
            raise _Dropped
        try:
            async with asyncio.timeout(GONE_CHECK_S):
                return await chunks.get()
        except TimeoutError:
            waited += GONE_CHECK_S
    raise TimeoutError


async def follow_logs(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: each `lines` event carries a batch and, as its id, the cursor after it (a
    reconnecting EventSource sends it back as Last-Event-ID: no line is lost or repeated); `end`
    carries the finished run. The caller's token is re-checked before every event and keep-alive: a
    removed user, or one whose token was rotated, gets `event: error` and the stream ends.

    Counted among the caller's open streams (app/streams.py: 429 beyond the limit) until it ends, however
    it ends; a client that takes nothing for the stall timeout is cut off (it may resume from its cursor)."""
    core = request.app[CORE]
    name = request.match_info["name"]
    after = parse_log_cursor(request.query.get("cursor") or request.headers.get("Last-Event-ID") or "")
    signed_in = users.SignedIn(core, actor_of(request))
    await runs.get(core, name)  # a missing run is a 404, before the stream starts
    what = f"following the logs of run {name} (HTTP)"
    ticket = core.streams.open(caller_of(request).name, what)
    try:
        return await _follow_logs(request, name, after, signed_in, what)
    finally:
        ticket.close()


async def _follow_logs(
    request: web.Request, name: str, after: dict[str, int], signed_in: users.SignedIn, what: str
) -> web.StreamResponse:
    core = request.app[CORE]
    chunks: asyncio.Queue[logs.LogChunk | BaseException | None] = asyncio.Queue(maxsize=2)

    async def produce() -> None:
        stream = logs.stream_logs(core, name, follow=True, after=after, blocks=True)
        try:
            async for chunk in stream:
                await chunks.put(chunk)  # waits while the client is slow: memory stays bounded
            await chunks.put(None)
        except Exception as e:  # a store error: the consumer reports it as the last event
            await chunks.put(e)
        finally:
            await stream.aclose()

    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    producer = asyncio.create_task(produce())
    try:
        while True:
            try:
                item = await _next_chunk(request, chunks)
            except TimeoutError:
                await signed_in.check()
                await _write(request, response, b": keep-alive\n\n", what)
                continue
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            await signed_in.check()
            if item.finished_run is not None:
                data = json.dumps(run_json(item.finished_run))
                await _write(
                    request, response, f"event: end\nid: {log_cursor(item.cursor)}\ndata: {data}\n\n".encode(), what
                )
                break
            lines = [line_json(j.job_name, ln) for j in item.jobs for ln in j.lines]
            cursor = log_cursor(item.cursor)
            data = json.dumps({"lines": lines, "cursor": cursor})
            await _write(request, response, f"event: lines\nid: {cursor}\ndata: {data}\n\n".encode(), what)
    except _Dropped:
        return response
    except (CoordinatorError, StoreError) as e:
        # Headers are sent: the error goes as the stream's last event.
        code = status_for(e)
        body = json.dumps({"error": {"code": (code.name if code else "internal").lower(), "message": str(e)}})
        try:
            await _write(request, response, f"event: error\ndata: {body}\n\n".encode(), what)
        except _Dropped:
            return response
    finally:
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
    await response.write_eof()
    return response


async def list_artifacts(request: web.Request) -> web.StreamResponse:
    listing = await artifacts.list_artifacts(request.app[CORE], request.match_info["name"])
    files = [{"job_name": f.job_name, "path": f.path, "size": f.size, "sha256": f.sha256} for f in listing.files]
    return web.json_response({"files": files})


async def list_agents(request: web.Request) -> web.StreamResponse:
    return web.json_response({"agents": [agent_json(a) for a in await agents.list_agents(request.app[CORE])]})


async def queue(request: web.Request) -> web.StreamResponse:
    return web.json_response({"jobs": [queue_json(e) for e in await waiting.queue(request.app[CORE])]})


async def download_artifact(request: web.Request) -> web.StreamResponse:
    """One artifact file, streamed from the store (no presigned URL: the caller may not reach the store).
    Counted among the caller's open streams while it lasts."""
    core = request.app[CORE]
    m = request.match_info
    what = f"downloading {m['path']} of run {m['name']} (HTTP)"
    ticket = core.streams.open(caller_of(request).name, what)
    chunks = artifacts.download(core, m["name"], m["job"], m["path"])
    response: web.StreamResponse | None = None
    try:
        async for chunk in chunks:  # the first read raises NotFound before anything is sent
            if response is None:
                filename = m["path"].rsplit("/", 1)[-1].replace('"', "")
                response = web.StreamResponse(
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Disposition": f'attachment; filename="{filename}"',
                        "X-Content-Type-Options": "nosniff",
                    }
                )
                await response.prepare(request)
            await _write(request, response, chunk, what)
    except _Dropped:
        assert response is not None
        return response
    finally:
        ticket.close()
        await chunks.aclose()  # type: ignore[attr-defined]
    if response is None:  # an empty file
        return web.Response(body=b"", headers={"Content-Type": "application/octet-stream"})
    await response.write_eof()
    return response


async def stop_run(request: web.Request) -> web.StreamResponse:
    run = await runs.stop(request.app[CORE], actor_of(request), request.match_info["name"])
    return web.json_response(run_json(run))


def _tag_json(t: tags.Tag) -> dict[str, Any]:
    return {
        "name": t.name,
        "run_name": t.run_name,
        "workflow": t.workflow,
        "repository": t.repository,
        "created_at_ns": t.created_at_ns,
    }


async def list_tags(request: web.Request) -> web.StreamResponse:
    q = request.query
    found = await tags.list_tags(
        request.app[CORE], caller_of(request).name, q.get("repository", ""), q.get("all", "") in ("1", "true")
    )
    return web.json_response({"tags": [_tag_json(t) for t in found]})


def _secret_json(s: secrets.Secret) -> dict[str, Any]:
    # Never a value: there is none to give (app/secrets.py returns names and times only).
    return {"name": s.name, "personal": s.personal, "created_at_ns": s.created_at_ns, "updated_at_ns": s.updated_at_ns}


async def list_secrets(request: web.Request) -> web.StreamResponse:
    found = await secrets.list_secrets(request.app[CORE], actor_of(request))
    return web.json_response({"secrets": [_secret_json(s) for s in found]})


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise BadParam("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadParam("the body must be a JSON object")
    return body


async def put_secret(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    value, personal = body.get("value"), body.get("personal", False)
    if not isinstance(value, str) or not isinstance(personal, bool):
        raise BadParam('the body is {"value": "...", "personal": true|false}')
    secret = await secrets.add(request.app[CORE], actor_of(request), request.match_info["secret"], value, personal)
    return web.json_response(_secret_json(secret))


async def delete_secret(request: web.Request) -> web.StreamResponse:
    personal = request.query.get("personal", "") in ("1", "true")
    await secrets.delete(request.app[CORE], actor_of(request), request.match_info["secret"], personal)
    return web.json_response({})


def _user_json(u: users.User) -> dict[str, Any]:
    return {"name": u.name, "role": u.role, "created_at_ns": u.created_at, "last_seen_at_ns": u.last_seen_at}


async def list_users(request: web.Request) -> web.StreamResponse:
    found = await users.list_users(request.app[CORE])
    return web.json_response({"users": [_user_json(u) for u in found]})


async def add_user(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    name, role = body.get("name"), body.get("role", "member")
    if not isinstance(name, str) or not isinstance(role, str):
        raise BadParam('the body is {"name": "...", "role": "viewer"|"member"|"admin"}')
    new = await users.add(request.app[CORE], name, role, caller_of(request).name)
    # The token is in this answer only (stored as a hash): the admin hands it over once.
    return web.json_response({"user": _user_json(new.user), "token": new.token})


async def remove_user(request: web.Request) -> web.StreamResponse:
    await users.remove(request.app[CORE], request.match_info["user"], caller_of(request).name)
    return web.json_response({})


async def rotate_user_token(request: web.Request) -> web.StreamResponse:
    new = await users.rotate(request.app[CORE], request.match_info["user"], actor_of(request))
    return web.json_response({"user": _user_json(new.user), "token": new.token})


def _join_token_json(r: JoinTokenRow) -> dict[str, Any]:
    return {
        "id": r.id,
        "created_at_ns": r.created_at,
        "expires_at_ns": r.expires_at,
        "uses": r.uses,
        "max_uses": r.max_uses,
        "revoked_at_ns": r.revoked_at,
    }


async def list_join_tokens(request: web.Request) -> web.StreamResponse:
    rows = await join_tokens.list_tokens(request.app[CORE])
    return web.json_response({"join_tokens": [_join_token_json(r) for r in rows]})


async def create_join_token(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    ttl_s, max_uses = body.get("ttl_s", 0), body.get("max_uses", 0)
    if not isinstance(ttl_s, int | float) or isinstance(ttl_s, bool) or type(max_uses) is not int:
        raise BadParam('the body is {"ttl_s": seconds (0: never expires), "max_uses": n (0: unlimited)}')
    new = await join_tokens.create(request.app[CORE], float(ttl_s), max_uses, caller_of(request).name)
    return web.json_response({"join_token": _join_token_json(new.row), "token": new.token})


async def revoke_join_token(request: web.Request) -> web.StreamResponse:
    row = await join_tokens.revoke(request.app[CORE], request.match_info["id"], caller_of(request).name)
    return web.json_response({"join_token": _join_token_json(row)})


async def openapi(request: web.Request) -> web.StreamResponse:
    from dstack.coordinator.http.openapi import document

    return web.json_response(document(ENDPOINTS))


_NAME = Param("name", "path", "the run's name")
_USER = Param("user", "path", "the user's name")
_RUN_FILTERS = (
    Param("owner", "query", "only runs of these users", repeated=True),
    Param("workflow", "query", "only runs of these workflows", repeated=True),
    Param("status", "query", "only runs in these statuses (submitted, running, done, ...)", repeated=True),
    Param("repository", "query", "only runs of this repository"),
    Param("limit", "query", f"runs per page, 1 to {runs.MAX_PAGE} (default 100)", kind="integer"),
    Param("cursor", "query", "next_cursor of the previous page"),
)
_LOG_CURSOR = Param("cursor", "query", "the cursor of the previous answer (or event): lines after it")

# Every endpoint the coordinator serves under /api. /metrics is served beside them (metrics.py).
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("GET", "/api/openapi.json", "", openapi, "This document"),
    Endpoint("GET", "/api/whoami", "GetInfo", whoami, "The caller's user name and role"),
    Endpoint(
        "GET",
        "/api/runs",
        "ListRuns",
        list_runs,
        "Runs, newest first, with their jobs; paged (follow next_cursor until it is null)",
        _RUN_FILTERS,
    ),
    Endpoint("GET", "/api/runs/{name}", "GetRun", get_run, "One run with its jobs", (_NAME,)),
    Endpoint(
        "GET",
        "/api/runs/{name}/record",
        "GetRunRecord",
        get_run_record,
        "The run's record: code, resolved workflow, environment, GPUs, timings, inputs and artifacts"
        " (docs/reproducibility.md)",
        (_NAME,),
    ),
    Endpoint(
        "GET",
        "/api/runs/{name}/logs",
        "StreamLogs",
        run_logs,
        "Log lines after a cursor (call again with the returned cursor until lines is empty); with"
        " `Accept: text/event-stream`, the same as /logs/stream",
        (_NAME, _LOG_CURSOR),
    ),
    Endpoint(
        "GET",
        "/api/runs/{name}/logs/stream",
        "StreamLogs",
        follow_logs,
        "Server-Sent Events: `lines` events (id: the cursor after them) until the run ends, then `end`",
        (_NAME, _LOG_CURSOR, Param("Last-Event-ID", "header", "the id of the last event received: resume after it")),
        response="text/event-stream",
    ),
    Endpoint(
        "GET", "/api/runs/{name}/artifacts", "ListArtifacts", list_artifacts, "The run's artifact files", (_NAME,)
    ),
    Endpoint(
        "GET",
        "/api/runs/{name}/artifacts/{job}/{path:.+}",
        "DownloadArtifact",
        download_artifact,
        "One artifact file's bytes",
        (
            _NAME,
            Param("job", "path", "the job's name"),
            Param("path", "path", "the file's path in the job's artifacts"),
        ),
        response="application/octet-stream",
    ),
    Endpoint(
        "POST",
        "/api/runs/{name}/stop",
        "StopRun",
        stop_run,
        "Stops the run (its owner or an admin); answers the run",
        (_NAME,),
    ),
    Endpoint("GET", "/api/agents", "ListAgents", list_agents, "The agents, each with its GPUs"),
    Endpoint(
        "GET",
        "/api/tags",
        "ListTags",
        list_tags,
        "Tags of a repository (default: the caller's uploads'), or all with all=true",
        (Param("repository", "query", "OWNER/REPO"), Param("all", "query", "true: every repository's", "boolean")),
    ),
    Endpoint("GET", "/api/secrets", "ListSecrets", list_secrets, "The team's and the caller's secrets: names only"),
    Endpoint(
        "PUT",
        "/api/secrets/{secret}",
        "AddSecret",
        put_secret,
        'Adds or replaces a secret; body {"value": "...", "personal": false}; a team secret needs an admin.'
        " The value is never returned, by this or any endpoint",
        (Param("secret", "path", "the secret's name"),),
    ),
    Endpoint(
        "DELETE",
        "/api/secrets/{secret}",
        "DeleteSecret",
        delete_secret,
        "Deletes a secret (a team secret: an admin)",
        (Param("secret", "path", "the secret's name"), Param("personal", "query", "true: the caller's own", "boolean")),
    ),
    Endpoint("GET", "/api/users", "ListUsers", list_users, "Users and their roles (never tokens)"),
    Endpoint(
        "POST",
        "/api/users",
        "AddUser",
        add_user,
        'Adds a user; body {"name": "...", "role": "member"}; answers the user and its token (this answer only)',
    ),
    Endpoint("DELETE", "/api/users/{user}", "RemoveUser", remove_user, "Removes a user", (_USER,)),
    Endpoint(
        "POST",
        "/api/users/{user}/token",
        "RotateUserToken",
        rotate_user_token,
        "Replaces a user's token (the old one stops working at once); answers the new one, this answer only",
        (_USER,),
    ),
    Endpoint("GET", "/api/join-tokens", "ListJoinTokens", list_join_tokens, "Join tokens (admins; never values)"),
    Endpoint(
        "POST",
        "/api/join-tokens",
        "CreateJoinToken",
        create_join_token,
        'Creates a join token for agents; body {"ttl_s": 86400, "max_uses": 1} (0: no limit); answers its value once',
    ),
    Endpoint(
        "POST",
        "/api/join-tokens/{id}/revoke",
        "RevokeJoinToken",
        revoke_join_token,
        "Revokes a join token: agents can no longer join with it",
        (Param("id", "path", "the join token's id"),),
    ),
    Endpoint(
        "GET",
        "/api/queue",
        "ListRuns",
        queue,
        "Waiting jobs in the scheduler's order, with why each waits and its estimated start",
    ),
)


def is_bad_param(e: Exception) -> web.Response | None:
    return bad_request(str(e)) if isinstance(e, BadParam) else None
