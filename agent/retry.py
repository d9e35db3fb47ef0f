"""The agent's one retry policy: for every coordinator call and every store transfer it makes, which
failures are final and which are worth another try, and how long to keep trying.

The table (also in docs/lifecycle.md, "What the agent retries"). Outcomes:
  FINAL       fail now with the error: the job fails with its message as the reason
  RETRY       the same call again after a backoff (exponential, jittered), until the deadline
              (`--store-retry`, 300 s) has passed since the first failure
  REGRANT     the presigned URL is no longer valid: ask the coordinator for a new grant and send again
              at once (at most MAX_REGRANTS times in a row, so a store whose clock is off cannot loop)
  REREGISTER  the coordinator does not know the agent's token: the session registers again (with the
              join token); a job's call waits with backoff, as for RETRY, and is sent with the new token
  REMOVED     an admin removed this agent (UNAUTHENTICATED, "this agent was removed by an admin"): the
              agent stops with that message (FatalAgentError); a job's call fails at once

The session itself (agent/connection.py: Connect) never gives up: its jobs keep running meanwhile, so
every failure but REREGISTER and REMOVED is retried with SESSION_BACKOFF for as long as the agent runs;
Register fails the agent (FatalAgentError) on a FINAL or REREGISTER outcome (a wrong, revoked, expired
or used-up join token, a taken name), and so does REMOVED anywhere.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from dstack.protos.refusals import is_agent_removed
from dstack.storage.backoff import Backoff
from dstack.storage.errors import (
    AccessDenied,
    ChecksumMismatch,
    ExpiredGrant,
    InvalidKey,
    NoSuchBucket,
    ObjectNotFound,
    StoreError,
    StoreUnavailable,
)

log = logging.getLogger("dstack.agent")
T = TypeVar("T")
SC = grpc.StatusCode


class Outcome(enum.Enum):
    FINAL = "final"
    RETRY = "retry"
    REGRANT = "regrant"
    REREGISTER = "reregister"
    REMOVED = "removed"


F, R, G, A = Outcome.FINAL, Outcome.RETRY, Outcome.REGRANT, Outcome.REREGISTER

# gRPC status of a coordinator call -> outcome. The coordinator's side of the mapping (domain and store
# errors -> status) is coordinator/services/rpc.py: _CODES.
GRPC: dict[grpc.StatusCode, Outcome] = {
    SC.CANCELLED: R,  # the coordinator shut down mid-call (our own cancellation is CancelledError instead)
    SC.UNKNOWN: R,  # an unexpected exception in the coordinator (e.g. a locked database): may pass
    SC.INVALID_ARGUMENT: F,  # the request can never succeed as sent (e.g. an artifact path outside)
    SC.DEADLINE_EXCEEDED: R,  # slow, not refused
    SC.NOT_FOUND: F,  # no such run, job, code blob or artifact
    SC.ALREADY_EXISTS: F,  # the agent's name is held by another agent that is online
    SC.PERMISSION_DENIED: F,  # not this agent's job, code or input; or the store refused the coordinator
    SC.RESOURCE_EXHAUSTED: R,  # overloaded; the agent's messages are batched below gRPC's size limit
    SC.FAILED_PRECONDITION: F,  # not in this state (job not on this agent), or the bucket does not exist
    SC.ABORTED: R,  # a conflicting concurrent change: the same call again will see the new state
    SC.OUT_OF_RANGE: F,
    SC.UNIMPLEMENTED: F,  # a coordinator older than this agent
    SC.INTERNAL: R,  # gRPC's own transport failures (RST_STREAM) come as INTERNAL
    SC.UNAVAILABLE: R,  # the coordinator is unreachable, or its store is (a transient store error)
    SC.DATA_LOSS: F,  # the stored bytes differ from their checksum: a new request reads the same bytes
    SC.UNAUTHENTICATED: A,  # the coordinator does not know this agent's token
}

# Store errors of the agent's own presigned transfers (storage/transfer.py) -> outcome; the first class
# that matches wins, so subclasses come before their bases (storage/errors.py has the tree).
STORE: tuple[tuple[type[StoreError], Outcome], ...] = (
    (StoreUnavailable, R),  # refused or reset connections, timeouts, HTTP 5xx, 408, 429, SlowDown
    (ExpiredGrant, G),  # 403 "Request has expired" (or past the URL's X-Amz-Expires), NoSuchUpload
    (AccessDenied, F),  # 403 AccessDenied, SignatureDoesNotMatch, InvalidAccessKeyId
    (NoSuchBucket, F),
    (ObjectNotFound, F),  # 404: the object is not there; asking again will not put it there
    (ChecksumMismatch, F),  # the stored object is not what was recorded; nothing was kept
    (InvalidKey, F),
    (StoreError, F),  # anything else the store refused (other 4xx): as sent, it will be refused again
)

MAX_REGRANTS = 3
SESSION_BACKOFF = Backoff(deadline_s=math.inf, first_s=0.1, max_s=2.0)


def classify(e: BaseException) -> Outcome:
    if isinstance(e, grpc.aio.AioRpcError):
        if e.code() == SC.UNAUTHENTICATED and is_agent_removed(e.details()):
            return Outcome.REMOVED  # not "unknown token": registering again must not be tried
        return GRPC.get(e.code(), F)
    if isinstance(e, StoreError):
        return next(outcome for cls, outcome in STORE if isinstance(e, cls))
    if isinstance(e, asyncio.InvalidStateError):
        return R  # grpc.aio raises it from write() on a call that already failed (connection refused)
    return F


def describe(e: BaseException) -> str:
    """The error as a job's failure reason: what the coordinator or the store said."""
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.details() or 'no details'} ({e.code().name})"
    return str(e) or type(e).__name__


class CallFailed(Exception):
    """A call failed for good: a FINAL outcome, or the deadline passed. The message is the reason."""

    def __init__(self, message: str, outcome: Outcome) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass(frozen=True)
class RetryPolicy:
    backoff: Backoff = field(default_factory=lambda: Backoff(deadline_s=300.0))
    max_regrants: int = MAX_REGRANTS

    @property
    def deadline_s(self) -> float:
        return self.backoff.deadline_s

    def retries_in_place(self, e: StoreError) -> bool:
        """For the transfer engine: which failed requests it repeats itself (one part, not a whole file)."""
        return classify(e) is Outcome.RETRY

    async def call(self, what: str, fn: Callable[[], Awaitable[T]], fail: type[Exception] = CallFailed) -> T:
        """Runs `fn` (a coordinator call, or a grant and the transfer it allows) under the policy.

        On a FINAL outcome, or once the deadline has passed, raises `fail` (CallFailed or a subclass,
        or any exception taking a message) saying what failed and why, from the last error."""
        attempts = self.backoff.start()
        regrants = 0
        while True:
            try:
                return await fn()
            except (grpc.aio.AioRpcError, StoreError, asyncio.InvalidStateError) as e:
                outcome = classify(e)
                if outcome is Outcome.REGRANT and regrants < self.max_regrants:
                    regrants += 1
                    log.info("%s: the grant expired; asking for a new one (%s)", what, describe(e))
                    continue
                retry = outcome in (Outcome.RETRY, Outcome.REREGISTER) and not getattr(e, "exhausted", False)
                delay = attempts.next_delay() if retry else None
                if delay is None:
                    gave_up = f" (gave up after {attempts.elapsed():.0f}s)" if retry else ""
                    raise _failure(fail, f"{what} failed: {describe(e)}{gave_up}", outcome) from e
                regrants = 0
                log.warning("%s failed (%s); retry %d in %.1fs", what, describe(e), attempts.failures, delay)
                await asyncio.sleep(delay)


def _failure(fail: type[Exception], message: str, outcome: Outcome) -> Exception:
    if issubclass(fail, CallFailed):
        return fail(message, outcome)
    return fail(message)
