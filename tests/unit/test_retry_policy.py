"""The agent's retry table (agent/retry.py), the store's error tree (storage/errors.py) and the
coordinator's mapping between them (coordinator/services/rpc.py: _CODES), each as documented."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Awaitable, Callable

import grpc
import pytest

from dstack.agent.retry import GRPC, CallFailed, Outcome, RetryPolicy, classify
from dstack.coordinator.services.rpc import status_for
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
    from_http,
)
from dstack.storage.presign import Credentials, PathStylePresigner
from dstack.storage.transfer import _url_expired

SC = grpc.StatusCode
F, R, G, A = Outcome.FINAL, Outcome.RETRY, Outcome.REGRANT, Outcome.REREGISTER

# The documented table (docs/lifecycle.md, "What the agent retries").
EXPECTED_GRPC = {
    SC.CANCELLED: R,
    SC.UNKNOWN: R,
    SC.INVALID_ARGUMENT: F,
    SC.DEADLINE_EXCEEDED: R,
    SC.NOT_FOUND: F,
    SC.ALREADY_EXISTS: F,
    SC.PERMISSION_DENIED: F,
    SC.RESOURCE_EXHAUSTED: R,
    SC.FAILED_PRECONDITION: F,
    SC.ABORTED: R,
    SC.OUT_OF_RANGE: F,
    SC.UNIMPLEMENTED: F,
    SC.INTERNAL: R,
    SC.UNAVAILABLE: R,
    SC.DATA_LOSS: F,
    SC.UNAUTHENTICATED: A,
}


def rpc_error(code: grpc.StatusCode, details: str = "") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def test_every_grpc_code_has_its_documented_outcome() -> None:
    assert set(GRPC) == set(SC) - {SC.OK}  # no code is left to a default
    assert GRPC == EXPECTED_GRPC
    for code, outcome in EXPECTED_GRPC.items():
        assert classify(rpc_error(code)) is outcome, code


@pytest.mark.parametrize(
    ("error", "outcome", "status"),
    [
        (StoreUnavailable("x"), R, SC.UNAVAILABLE),
        (ExpiredGrant("x"), G, SC.UNAVAILABLE),
        (AccessDenied("x"), F, SC.PERMISSION_DENIED),
        (NoSuchBucket("x"), F, SC.FAILED_PRECONDITION),
        (ObjectNotFound("k"), F, SC.NOT_FOUND),
        (ChecksumMismatch("x"), F, SC.DATA_LOSS),
        (InvalidKey("x"), F, SC.INVALID_ARGUMENT),
        (StoreError("x"), F, SC.FAILED_PRECONDITION),
    ],
)
def test_every_store_error_is_classified_and_mapped_to_its_own_code(
    error: StoreError, outcome: Outcome, status: grpc.StatusCode
) -> None:
    assert classify(error) is outcome  # what the agent does when its own transfer fails so
    assert status_for(error) is status  # what the coordinator answers when its store call fails so
    # ...and the agent does the same with the coordinator's answer as with the error itself, except for
    # an expired grant: the coordinator signs its own requests afresh, so there it only passes.
    expected = R if outcome is G else outcome
    assert classify(rpc_error(status)) is expected


@pytest.mark.parametrize(
    ("status", "code", "message", "expired", "cls"),
    [
        (503, "SlowDown", "Please reduce your request rate.", False, StoreUnavailable),
        (500, "InternalError", "", False, StoreUnavailable),
        (502, "", "", False, StoreUnavailable),
        (429, "", "", False, StoreUnavailable),
        (408, "RequestTimeout", "", False, StoreUnavailable),
        (403, "AccessDenied", "Request has expired", False, ExpiredGrant),  # AWS, MinIO, SeaweedFS
        (403, "AccessDenied", "Access Denied", True, ExpiredGrant),  # the URL's own expiry has passed
        (400, "ExpiredToken", "The provided token has expired.", False, ExpiredGrant),
        (404, "NoSuchUpload", "", False, ExpiredGrant),  # the grant's multipart upload is gone
        (403, "AccessDenied", "Access Denied", False, AccessDenied),
        (403, "SignatureDoesNotMatch", "", False, AccessDenied),
        (403, "InvalidAccessKeyId", "", False, AccessDenied),
        (404, "NoSuchBucket", "", False, NoSuchBucket),
        (404, "NoSuchKey", "", False, ObjectNotFound),
        (400, "EntityTooSmall", "", False, StoreError),
    ],
)
def test_http_answers_of_the_store_become_their_error_types(
    status: int, code: str, message: str, expired: bool, cls: type[StoreError]
) -> None:
    e = from_http(status, code, message, "data/x", expired=expired)
    assert type(e) is cls
    assert str(e).startswith(f"data/x: HTTP {status}")


def test_an_expired_presigned_url_is_recognised_from_the_url_itself() -> None:
    signer = PathStylePresigner("http://s3:9000", "us-east-1", lambda: Credentials("AK", "SK", None))
    old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=120)
    assert _url_expired(signer.url("GET", "b", "k", 60, now=old))
    assert not _url_expired(signer.url("GET", "b", "k", 3600, now=old))
    assert not _url_expired("http://s3:9000/b/k")  # not presigned: nothing to tell


# ---- the policy's loop, with small backoff so that nothing waits long --------------------------------

FAST = RetryPolicy(Backoff(deadline_s=5.0, first_s=0.001, max_s=0.01))


def scripted(*failures: BaseException) -> tuple[Callable[[], Awaitable[str]], list[int]]:
    """A call that fails with each of `failures` in turn, then returns "ok"; and its call count."""
    calls = [0]

    async def fn() -> str:
        calls[0] += 1
        if calls[0] <= len(failures):
            raise failures[calls[0] - 1]
        return "ok"

    return fn, calls


def test_transient_failures_are_retried_until_the_call_succeeds() -> None:
    fn, calls = scripted(rpc_error(SC.UNAVAILABLE), StoreUnavailable("503"), rpc_error(SC.UNAUTHENTICATED))
    assert asyncio.run(FAST.call("grant", fn)) == "ok"
    assert calls[0] == 4


def test_a_final_failure_is_raised_at_once_with_what_the_coordinator_said() -> None:
    fn, calls = scripted(rpc_error(SC.PERMISSION_DENIED, "access denied to bucket 'b' with access key 'AK'"))
    policy = RetryPolicy()  # the real deadline (300 s): a final failure must not wait for it
    with pytest.raises(CallFailed, match=r"grant failed: access denied to bucket 'b' .*\(PERMISSION_DENIED\)") as e:
        asyncio.run(policy.call("grant", fn))
    assert calls[0] == 1 and e.value.outcome is F


def test_an_expired_grant_is_asked_again_at_once_but_not_forever() -> None:
    fn, calls = scripted(ExpiredGrant("expired"))
    assert asyncio.run(RetryPolicy(Backoff(deadline_s=0.0)).call("get", fn)) == "ok"  # no backoff needed
    assert calls[0] == 2
    fn, calls = scripted(*[ExpiredGrant("expired")] * 10)
    with pytest.raises(CallFailed, match="get failed: expired") as e:
        asyncio.run(FAST.call("get", fn))
    assert calls[0] == FAST.max_regrants + 1 and e.value.outcome is G


def test_retries_stop_at_the_deadline() -> None:
    fn, calls = scripted(*[rpc_error(SC.UNAVAILABLE, "down")] * 1000)
    policy = RetryPolicy(Backoff(deadline_s=0.05, first_s=0.001, max_s=0.005))
    with pytest.raises(CallFailed, match=r"commit failed: down \(UNAVAILABLE\) \(gave up after"):
        asyncio.run(policy.call("commit", fn))
    assert 1 < calls[0] < 1000


def test_a_store_error_the_transfer_already_retried_to_its_deadline_is_not_retried_again() -> None:
    e = StoreUnavailable("503")
    e.exhausted = True
    fn, calls = scripted(e)
    with pytest.raises(CallFailed):
        asyncio.run(FAST.call("get", fn))
    assert calls[0] == 1


def test_other_exceptions_pass_through_untouched() -> None:
    fn, calls = scripted(ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        asyncio.run(FAST.call("x", fn))
    assert calls[0] == 1


def test_backoff_grows_with_jitter_up_to_its_cap_and_stops_at_the_deadline() -> None:
    attempts = Backoff(deadline_s=3600.0, first_s=0.2, max_s=5.0).start()
    delays = [attempts.next_delay() for _ in range(10)]
    bases = [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0, 5.0]
    for d, base in zip(delays, bases, strict=True):
        assert d is not None and 0.5 * base <= d <= 1.5 * base  # jittered around the base
    assert attempts.failures == 10
    assert Backoff(deadline_s=0.0).start().next_delay() is None  # no time: no retry


def test_a_removed_agent_is_told_apart_from_an_unknown_token() -> None:
    """Unknown: register again. Removed by an admin: stop (agent/connection.py raises FatalAgentError)."""
    from dstack.protos.refusals import agent_removed

    assert classify(rpc_error(SC.UNAUTHENTICATED, "unknown agent token: register the agent again")) is A
    removed = rpc_error(SC.UNAUTHENTICATED, agent_removed("gpu-1") + " (Connect needs an agent token)")
    assert classify(removed) is Outcome.REMOVED
    assert classify(rpc_error(SC.PERMISSION_DENIED, agent_removed("gpu-1"))) is F  # only as UNAUTHENTICATED

    async def call() -> None:
        raise removed

    async def run() -> None:
        with pytest.raises(CallFailed) as e:
            await RetryPolicy(Backoff(deadline_s=60)).call("GetCode", call)
        assert e.value.outcome is Outcome.REMOVED and "removed by an admin" in str(e.value)

    asyncio.run(run())
