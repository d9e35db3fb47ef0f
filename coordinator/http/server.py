"""Serves the HTTP API and /metrics in the coordinator's asyncio loop (aiohttp), with the gRPC
server's TLS (the same certificate and key) and its tokens and roles (coordinator/auth.py)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import sqlite3
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web

from dstack.coordinator.app.core import Core
from dstack.coordinator.auth import PERMISSIONS, Authenticator, Caller, Refused, Role, RoleRefused
from dstack.coordinator.errors import CoordinatorError
from dstack.coordinator.http import dashboard, metrics
from dstack.coordinator.http.api import CORE, ENDPOINTS, BadParam, Endpoint, Handler
from dstack.coordinator.http.errors import bad_request, domain_error_response, error_response
from dstack.coordinator.tls import ServerTls
from dstack.storage import StoreError

log = logging.getLogger("dstack.coordinator")
_C = "/dstack.v1.ClientService/"


def bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


async def _check(auth: Authenticator, role: Role, request: web.Request, what: str) -> Caller | web.Response:
    try:
        return await auth.check(role, bearer(request))
    except RoleRefused as e:
        return error_response(e.code, e.message(what))
    except Refused as e:
        return error_response(e.code, f"{e} ({what} needs a user token: `Authorization: Bearer TOKEN`)")
    except sqlite3.Error as e:  # the database could not answer: the caller may retry
        return error_response(grpc.StatusCode.UNAVAILABLE, f"cannot check the token: {e}")


def guarded(ep: Endpoint, auth: Authenticator) -> Handler:
    """The endpoint's handler behind its role: the role of the gRPC method it mirrors."""
    role = PERMISSIONS[_C + ep.rpc] if ep.rpc else Role.PUBLIC
    what = f"{ep.method} {ep.path}"

    async def handle(request: web.Request) -> web.StreamResponse:
        who = await _check(auth, role, request, what)
        if isinstance(who, web.Response):
            return who
        request["caller"] = who
        try:
            return await ep.handler(request)
        except BadParam as e:
            return bad_request(str(e))
        except (CoordinatorError, StoreError) as e:
            response = domain_error_response(e)
            if response is None:
                raise
            return response

    return handle


def metrics_handler(auth: Authenticator, scrape_token: str | None) -> Handler:
    """/metrics: any user's token (a viewer's is enough), or the scrape token of --metrics-token-file."""

    async def handle(request: web.Request) -> web.StreamResponse:
        token = bearer(request)
        if not (scrape_token and token and hmac.compare_digest(token.encode(), scrape_token.encode())):
            who = await _check(auth, Role.USER, request, "GET /metrics")
            if isinstance(who, web.Response):
                return who
        body, content_type = await metrics.exposition(request.app[CORE])
        return web.Response(body=body, headers={"Content-Type": content_type})

    return handle


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (no such route, a method the route does not take) in the API's JSON shape."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(e.status, "invalid_argument")
        headers = {k: v for k, v in e.headers.items() if k == "Allow"}
        return web.json_response({"error": {"code": code, "message": e.reason}}, status=e.status, headers=headers)


async def _safe_headers(request: web.Request, response: web.StreamResponse) -> None:
    # Answers carry logs and names: never cached, never sniffed into something a browser would run.
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")


def build_app(core: Core, auth: Authenticator, scrape_token: str | None = None) -> web.Application:
    # No CORS headers: another site's scripts cannot read answers; tokens travel in a header, never a
    # cookie, so there is nothing for a cross-site request to ride on.
    app = web.Application(middlewares=[json_errors], client_max_size=1 << 20)
    app.on_response_prepare.append(_safe_headers)
    app[CORE] = core
    for ep in ENDPOINTS:
        app.router.add_route(ep.method, ep.path, guarded(ep, auth))
    app.router.add_route("GET", "/metrics", metrics_handler(auth, scrape_token))
    dashboard.add_routes(app)  # the web dashboard at /: static files, no token needed to load them
    return app


def ssl_context(tls: ServerTls, state_dir: Path) -> ssl.SSLContext:
    """The gRPC server's certificate chain and key. `ssl` loads them only from files: a 0600 file in
    the 0700 state directory, removed at once."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    fd, name = tempfile.mkstemp(dir=state_dir, prefix=".http-tls-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(tls.key_pem + b"\n" + tls.chain_pem)
        ctx.load_cert_chain(name)
    finally:
        os.unlink(name)
    return ctx


@dataclass
class HttpServer:
    runner: web.AppRunner
    url: str  # e.g. https://127.0.0.1:8080 (the bound port, also for port 0)
    port: int

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_http(
    core: Core,
    auth: Authenticator,
    host: str,
    port: int,
    tls: ServerTls | None,
    state_dir: Path,
    scrape_token: str | None = None,
) -> HttpServer:
    ctx = await asyncio.to_thread(ssl_context, tls, state_dir) if tls is not None else None
    # A client holding a stream open (a followed log) must not hold up the coordinator's stop.
    runner = web.AppRunner(
        build_app(core, auth, scrape_token), access_log=None, handle_signals=False, shutdown_timeout=2.0
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ctx, reuse_address=True)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = int(runner.addresses[0][1])  # the one picked for port 0
    scheme = "https" if ctx is not None else "http"
    shown = f"[{host}]" if ":" in host else host
    return HttpServer(runner, f"{scheme}://{shown}:{bound}", bound)
