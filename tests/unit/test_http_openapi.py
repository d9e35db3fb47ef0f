"""The OpenAPI document lists exactly the routes the HTTP server serves, each with the role of the
gRPC method it mirrors (coordinator/auth.py)."""

from __future__ import annotations

from typing import Any, cast

from dstack.coordinator.auth import PERMISSIONS, Authenticator, Role
from dstack.coordinator.http import dashboard
from dstack.coordinator.http.api import ENDPOINTS
from dstack.coordinator.http.openapi import document, openapi_path, role_of
from dstack.coordinator.http.server import build_app

_C = "/dstack.v1.ClientService/"


def served_routes() -> set[tuple[str, str]]:
    app = build_app(cast(Any, None), cast(Authenticator, None))
    out = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if route.method != "HEAD":
            out.add((route.method, str(path)))
    return out


def test_openapi_lists_every_route_served_and_nothing_else() -> None:
    doc = document(ENDPOINTS)
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == served_routes() - dashboard.ROUTES  # the dashboard's static files are no API
    assert ("GET", "/metrics") in documented
    assert doc["openapi"].startswith("3.")


def test_each_endpoint_needs_the_role_of_its_grpc_method() -> None:
    doc = document(ENDPOINTS)
    for ep in ENDPOINTS:
        op = doc["paths"][openapi_path(ep.path)][ep.method.lower()]
        if ep.path == "/api/openapi.json":
            assert ep.rpc == "" and op["security"] == []
            continue
        role = PERMISSIONS[_C + ep.rpc]
        assert role_of(ep.rpc) == role.value
        assert op["security"] == [{"bearer": []}] and f"`{role.value}`" in op["description"]
        if ep.method == "GET" and ep.rpc != "ListJoinTokens":
            assert role is Role.USER, ep  # reads: any user, as in gRPC
        if ep.rpc == "RotateUserToken":
            assert role is Role.USER, ep  # anyone rotates their own token; another's: admins (app/users.rotate)
        elif ep.method != "GET" or ep.rpc == "ListJoinTokens":
            assert role in (Role.MEMBER, Role.ADMIN), ep  # a viewer changes nothing else, sees no join token


def test_only_the_document_is_public() -> None:
    assert [ep.path for ep in ENDPOINTS if not ep.rpc] == ["/api/openapi.json"]
