"""The artifact store: where code blobs, job artifacts and manifests live.

Key layout (docs/storage.md):
  code/<sha256>.tar.gz                      packed working trees, content-addressed
  runs/<run>/<job>/artifacts/<path>         files of a job's declared artifact folders
  runs/<run>/<job>/manifest.json            written last: the job's artifacts are complete
"""

from dstack.storage.base import ArtifactStore
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
from dstack.storage.local import LocalStore
from dstack.storage.open import open_store

__all__ = [
    "AccessDenied",
    "ArtifactStore",
    "ChecksumMismatch",
    "ExpiredGrant",
    "InvalidKey",
    "LocalStore",
    "NoSuchBucket",
    "ObjectNotFound",
    "StoreError",
    "StoreUnavailable",
    "open_store",
]
