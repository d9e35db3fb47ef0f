"""The OpenAPI 3.1 document of the JSON API, built from the endpoint table (api.ENDPOINTS): an
endpoint cannot be served without being documented, with the role it needs."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from dstack.coordinator.auth import PERMISSIONS

_C = "/dstack.v1.ClientService/"


def role_of(rpc: str) -> str:
    """The role an endpoint needs: its gRPC method's, from coordinator/auth.py; "public" for none."""
    return PERMISSIONS[_C + rpc].value if rpc else "public"


def openapi_path(path: str) -> str:
    """aiohttp's `{path:.+}` (a parameter with its pattern) as OpenAPI writes it: `{path}`."""
    return re.sub(r"\{(\w+):[^}]+\}", r"{\1}", path)


def document(endpoints: Sequence[Any]) -> dict[str, Any]:
    from dstack.coordinator.http.api import VERSION

    paths: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        role = role_of(ep.rpc)
        op: dict[str, Any] = {
            "summary": ep.summary,
            "operationId": re.sub(r"[^A-Za-z0-9]+", "_", f"{ep.method} {ep.path}").strip("_").lower(),
            "description": f"Needs the `{role}` role (as gRPC {ep.rpc})." if ep.rpc else "Public.",
            "parameters": [
                {
                    "name": p.name,
                    "in": p.where,
                    "required": p.where == "path",
                    "description": p.description,
                    "schema": {"type": "array", "items": {"type": p.kind}} if p.repeated else {"type": p.kind},
                    **({"explode": True} if p.repeated else {}),
                }
                for p in ep.params
            ],
            "responses": {
                "200": {"description": "OK", "content": {ep.response: {}}},
                "400": {"description": "A parameter is invalid"},
                "404": {"description": "No such object"},
            },
        }
        if ep.rpc:
            op["security"] = [{"bearer": []}]
            op["responses"]["401"] = {"description": "No token, or an invalid one"}
            op["responses"]["403"] = {"description": f"The token's role is below `{role}`"}
        else:
            op["security"] = []
        paths.setdefault(openapi_path(ep.path), {})[ep.method.lower()] = op
    paths["/metrics"] = {
        "get": {
            "summary": "Prometheus metrics (docs/metrics.md)",
            "operationId": "get_metrics",
            "description": "Needs the `user` role, or the token of `dstack server --metrics-token-file`.",
            "parameters": [],
            "security": [{"bearer": []}],
            "responses": {
                "200": {"description": "OK", "content": {"text/plain; version=0.0.4": {}}},
                "401": {"description": "No token, or an invalid one"},
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "dstack coordinator", "version": VERSION},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": paths,
    }
