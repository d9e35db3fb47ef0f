"""Errors the CLI prints as one clear message (no traceback) before exiting non-zero.

CliError
├── WorkflowError        a workflow file is wrong: names the file, line and column
├── ProviderError        a provider refused a workflow's fields
├── NotFoundError        a run, workflow or artifact that does not exist
├── CoordinatorUnreachable
├── TlsMismatch          the TLS settings and the coordinator disagree (untrusted certificate, TLS vs plaintext)
├── AuthError
├── RequestRejected      the coordinator refused a request (its message says why)
└── LimitReached         a per-user limit of the coordinator (queued jobs, submission rate)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # an annotation only: every command imports this module, few build a Location
    from pathlib import Path


class CliError(Exception):
    exit_code = 1


class Location(NamedTuple):
    file: Path
    line: int  # 1-based
    column: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class WorkflowError(CliError):
    exit_code = 2

    def __init__(self, message: str, location: Location | None = None) -> None:
        super().__init__(f"{location}: {message}" if location else message)
        self.location = location


class ProviderError(WorkflowError):
    pass


class NotFoundError(CliError):
    pass


class CoordinatorUnreachable(CliError):
    pass


class TlsMismatch(CliError):
    """Not worth retrying: the coordinator's certificate or transport is not what the CLI is set up for."""


class AuthError(CliError):
    pass


class RequestRejected(CliError):
    pass


class LimitReached(CliError):
    pass
