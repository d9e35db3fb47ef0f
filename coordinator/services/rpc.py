"""The one place where domain errors become gRPC status codes (callers are authenticated in coordinator/auth.py)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from dstack.coordinator.app.streams import StreamLimits, StreamTicket
from dstack.coordinator.errors import (
    AlreadyExists,
    Conflict,
    CoordinatorError,
    Forbidden,
    InvalidRequest,
    LimitExceeded,
    NotFound,
    NotStored,
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
    (Forbidden, grpc.StatusCode.PERMISSION_DENIED),
    (StorageUnavailable, grpc.StatusCode.UNAVAILABLE),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),  # a per-user limit: the message names it
    (NotStored, grpc.StatusCode.ABORTED),  # undone as a whole: the caller may send it again
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


async def first_message(request_iterator: AsyncIterator[Any]) -> Any:
    """The first message of a client stream (which carries the call's arguments)."""
    first = await anext(aiter(request_iterator), None)
    if first is None:
        raise InvalidRequest("an empty stream: the first message carries the call's arguments")
    return first


async def data_of(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    """The bytes of an upload's messages (each with a `data` field; the first already read)."""
    yield first.data
    async for msg in rest:
        yield msg.data


def hold_stream(limits: StreamLimits, context: Any, user: str, what: str) -> StreamTicket:
    """A place among the open long-lived calls (LimitExceeded when there is none), given back when the
    call is over for gRPC: the client read its status, cancelled, or went away. Not when the handler
    returns: a handler that gave up on a client that does not read leaves its last messages queued in
    gRPC until the client takes them or leaves, and the place bounds that memory too."""
    ticket = limits.open(user, what)
    context.add_done_callback(lambda _call: ticket.close())
    return ticket


async def write_or_drop(limits: StreamLimits, context: Any, message: Any, what: str) -> None:
    """Writes one message of a stream; ends the call when its client has taken nothing for the stall
    timeout (flow control held the write back all that while). The client gets the status after the
    messages it has not read yet."""
    try:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the write's result when the call is
        # cancelled just as the write completes, swallowing the cancel: the handler then ran on, holding its
        # place, until it next wrote (a quiet follow: never). asyncio.timeout lets a cancel from outside through.
        async with asyncio.timeout(limits.stall_s):
            await context.write(message)
    except TimeoutError:
        limits.dropped_slow += 1
        log.warning("%s: the client took nothing for %.0f s; stream ended", what, limits.stall_s)
        raise LimitExceeded(
            f"{what}: the coordinator ended this stream because its client took nothing for"
            f" {limits.stall_s:.0f} s while data waited (dstack server --stream-stall-timeout); start it again"
            " to go on"
        ) from None
