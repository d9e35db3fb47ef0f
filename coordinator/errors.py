"""Domain errors of the coordinator; `coordinator.services.rpc` maps each to one gRPC status code.

CoordinatorError
├── NotFound            (NOT_FOUND)            a run, job, code blob or artifact that does not exist
├── InvalidRequest      (INVALID_ARGUMENT)     a request that can never succeed as sent
├── Conflict            (FAILED_PRECONDITION)  valid, but not in the current state
├── AlreadyExists       (ALREADY_EXISTS)       a name that someone else holds (e.g. an online agent's)
├── Unauthenticated     (UNAUTHENTICATED)      missing or wrong token
├── Forbidden           (PERMISSION_DENIED)    a valid caller whose role may not do this (or an agent outside its jobs)
├── StorageUnavailable  (UNAVAILABLE)          the artifact store failed; retrying may help
├── LimitExceeded       (RESOURCE_EXHAUSTED)   a per-user limit (queued jobs, submission rate) is reached
└── NotStored           (ABORTED)              a database failure undid the whole request: sending it again is safe

The store's own errors (storage/errors.py) reach the RPC layer as they are and are mapped there too:
StoreUnavailable -> UNAVAILABLE (transient), AccessDenied -> PERMISSION_DENIED (the message names the
store, bucket and access key), NoSuchBucket -> FAILED_PRECONDITION, ObjectNotFound -> NOT_FOUND,
ChecksumMismatch -> DATA_LOSS, any other StoreError -> FAILED_PRECONDITION (refused as sent).
"""


class CoordinatorError(Exception):
    pass


class NotFound(CoordinatorError):
    pass


class SecretUnreadable(CoordinatorError):
    """A stored secret the coordinator's key cannot decrypt, met at start (the key file is not the one the
    database was written with, or the row is damaged): the coordinator does not start."""


class InvalidRequest(CoordinatorError):
    pass


class Conflict(CoordinatorError):
    pass


class AlreadyExists(CoordinatorError):
    pass


class Unauthenticated(CoordinatorError):
    pass


class Forbidden(CoordinatorError):
    pass


class StorageUnavailable(CoordinatorError):
    pass


class LimitExceeded(CoordinatorError):
    pass


class NotStored(CoordinatorError):
    """A database failure undid the whole request (one transaction): nothing of it was stored."""
