"""The web dashboard: a few static files (static/: HTML, CSS, one hand-written ES module) served
beside the API by the same aiohttp app. No build step, no CDN: the files ship in the package.

The page holds the user's token in sessionStorage and sends it as `Authorization: Bearer` to the
API, as any other client does: no cookie, so a cross-site form or image has no credential to ride
on (no CSRF), and the token never appears in a URL. What could read sessionStorage is a script
injected into the page; the Content-Security-Policy below allows only the shipped module, and the
module builds the page with textContent, never HTML strings.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self';"
    " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Every file served, by name: nothing else under static/ (or outside it) can be asked for.
FILES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "app.css": "text/css",
    "favicon.svg": "image/svg+xml",
}


# The dashboard's routes: static files, outside the API (no token to load them; the OpenAPI document
# lists the API only, and tests/unit/test_http_openapi.py leaves these out by this set).
ROUTES = {("GET", "/"), ("GET", "/static/{file}")}


def _load() -> dict[str, bytes]:
    folder = resources.files("dstack.coordinator.http") / "static"
    return {name: (folder / name).read_bytes() for name in FILES}


def _serve(name: str, body: bytes) -> web.Response:
    return web.Response(
        body=body,
        headers={
            "Content-Type": f"{FILES[name]}; charset=utf-8",
            "Content-Security-Policy": CSP,
            "X-Frame-Options": "DENY",
        },
    )


def add_routes(app: web.Application) -> None:
    files = _load()  # read once at start: a few tens of KiB, and no disk read in the loop afterwards

    async def index(request: web.Request) -> web.StreamResponse:
        return _serve("index.html", files["index.html"])

    async def asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["file"]
        if name not in files or name == "index.html":
            raise web.HTTPNotFound(reason=f"no dashboard file {name[:60]!r}")
        return _serve(name, files[name])

    handlers = {"/": index, "/static/{file}": asset}
    for method, path in sorted(ROUTES):
        app.router.add_route(method, path, handlers[path])
