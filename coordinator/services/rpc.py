"""The one place where domain errors become gRPC status codes, and where callers are authenticated."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from dstack.coordinator.errors import (
    AlreadyExists,
    Conflict,
    CoordinatorError,
    InvalidRequest,
    NotFound,
    StorageUnavailable,
    Unauthenticated,
)
from dstack.storage import (
    AccessDenied,
    ChecksumMismatch,
    ExpiredGrant,
    InvalidKey,
    NoSuchBucket,
    ObjectNotFound,
    StoreError,
    StoreUnavailable,
)

log = logging.getLogger("dstack.coordinator")

# First match wins: subclasses before their bases. What an agent does with each code: agent/retry.py.
_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (ObjectNotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidKey, grpc.StatusCode.INVALID_ARGUMENT),
    (Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (StorageUnavailable, grpc.StatusCode.UNAVAILABLE),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),  # transient: callers retry
    (ExpiredGrant, grpc.StatusCode.UNAVAILABLE),  # the coordinator's own credentials expired: boto renews them
    (AccessDenied, grpc.StatusCode.PERMISSION_DENIED),  # the store refused the coordinator's credentials
    (NoSuchBucket, grpc.StatusCode.FAILED_PRECONDITION),  # the coordinator's storage setting is wrong
    (ChecksumMismatch, grpc.StatusCode.DATA_LOSS),  # stored bytes differ from their recorded sha256
    (StoreError, grpc.StatusCode.FAILED_PRECONDITION),  # refused as sent (another 4xx): final
]


def status_for(exc: Exception) -> grpc.StatusCode | None:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return None


F = TypeVar("F", bound=Callable[..., Any])


def unary(fn: F) -> F:
    """Maps domain errors raised by a unary (or stream-in) handler to status codes."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return await fn(self, request, context)
        except (CoordinatorError, StoreError) as e:
            code = status_for(e)
            assert code is not None
            await context.abort(code, str(e))

    return wrapper  # type: ignore[return-value]


def streaming(fn: F) -> F:
    """Same as `unary`, for handlers that are async generators."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            async for item in fn(self, request, context):
                yield item
        except (CoordinatorError, StoreError) as e:
            code = status_for(e)
            assert code is not None
            await context.abort(code, str(e))

    return wrapper  # type: ignore[return-value]


def bearer_token(context: Any) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    raise Unauthenticated("missing token: run `dstack config` with the coordinator's address and your token")


async def authenticate(context: Any, lookup: Callable[[str], Awaitable[str | None]]) -> str:
    name = await lookup(bearer_token(context))
    if name is None:
        raise Unauthenticated("invalid token: check `dstack config`")
    return name
