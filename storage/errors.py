"""What went wrong with the artifact store, as types: callers decide by type whether to retry.

StoreError                  anything the store refused or could not do (unclassified ones are final)
├── StoreUnavailable        transient: connection refused or reset, timeouts, HTTP 5xx, 408, 429,
│                           SlowDown; retrying with backoff may succeed
├── AccessDenied            the store refused the credentials or the signature (403 AccessDenied,
│   │                       SignatureDoesNotMatch, InvalidAccessKeyId, a folder without permission)
│   └── ExpiredGrant        a presigned URL (or its multipart upload) is no longer valid: a fresh grant
│                           from the coordinator will do
├── NoSuchBucket            the bucket (or the store's folder) does not exist
├── ObjectNotFound          the object does not exist
├── ChecksumMismatch        the bytes differ from the sha256 they were recorded with
└── InvalidKey              a key that could leave the store's namespace

Not a store error: DiskFull (an OSError, ENOSPC or EDQUOT) is this machine's disk refusing a downloaded
file's bytes. No retry helps and the store is not to blame, so it names what was written, not the URL.

Who raises them: storage/s3.py (boto3 calls of the coordinator), storage/transfer.py (presigned
requests of agents and CLIs), storage/local.py (the folder store). The coordinator maps each to its own
gRPC status (coordinator/services/rpc.py), and agent/retry.py says which ones an agent retries.
"""

from __future__ import annotations

import errno


class StoreError(Exception):
    """The store failed or refused; retrying the same request will not help unless a subclass says so."""

    #: set by whoever already retried it until its deadline (the transfer engine): nobody retries it again
    exhausted = False


class StoreUnavailable(StoreError):
    """Transient: the store could not be reached or was overloaded."""


class AccessDenied(StoreError):
    """The store refused the credentials or signature: the message names the store and what to check."""


class ExpiredGrant(AccessDenied):
    """A presigned URL ran out of time (or its multipart upload is gone): ask the coordinator again."""


class NoSuchBucket(StoreError):
    """The bucket (or the folder) the store was configured with does not exist."""


class ObjectNotFound(StoreError):
    def __init__(self, key: str, detail: str = "") -> None:
        super().__init__(detail or f"object {key!r} is not in the store")
        self.key = key


class ChecksumMismatch(StoreError):
    """The bytes differ from their recorded sha256; nothing was kept."""


class InvalidKey(StoreError):
    """A key that could escape the store's namespace."""


# ENOSPC: no space left on the device; EDQUOT: the user's disk quota is used up. Both are this
# machine's disk, whoever's write met them.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFull(OSError):
    """The local disk refused a write (ENOSPC, EDQUOT): retrying the transfer cannot help."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.strerror)


def from_http(status: int, code: str, message: str, what: str, expired: bool = False) -> StoreError:
    """The error for an S3 error response (status, its XML Code and Message) to a request for `what`.

    `expired`: the caller knows the presigned URL's time has passed (stores differ in how they say it).
    """
    text = f"{what}: HTTP {status} {code or status}" + (f": {message}" if message else "")
    if status >= 500 or status in (408, 429) or code in ("SlowDown", "RequestTimeout", "ServiceUnavailable"):
        return StoreUnavailable(text)
    if code in ("ExpiredToken", "TokenRefreshRequired", "NoSuchUpload") or (
        status in (400, 403) and (expired or "expired" in message.lower())
    ):
        return ExpiredGrant(text + " (the grant expired; a new one is needed)")
    if status == 403 or code in ("AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"):
        return AccessDenied(text)
    if code == "NoSuchBucket":
        return NoSuchBucket(text)
    if status == 404:
        return ObjectNotFound(what, text)
    return StoreError(text)
