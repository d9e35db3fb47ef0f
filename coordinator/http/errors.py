"""Refusals and domain errors as HTTP responses: one table from the gRPC status code that
coordinator/services/rpc.py (domain errors) and coordinator/auth.py (refusals) already choose, so
both front ends answer the same error the same way."""

from __future__ import annotations

import grpc
from aiohttp import web

from dstack.coordinator.services.rpc import status_for

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.ABORTED: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
}


def error_response(code: grpc.StatusCode, message: str) -> web.Response:
    status = HTTP_STATUS.get(code, 500)
    headers = {"WWW-Authenticate": 'Bearer realm="dstack"'} if status == 401 else None
    body = {"error": {"code": code.name.lower(), "message": message}}
    return web.json_response(body, status=status, headers=headers)


def domain_error_response(e: Exception) -> web.Response | None:
    """The response for a domain or store error; None for anything else (a bug: aiohttp answers 500)."""
    code = status_for(e)
    return None if code is None else error_response(code, str(e))


def bad_request(message: str) -> web.Response:
    return error_response(grpc.StatusCode.INVALID_ARGUMENT, message)
