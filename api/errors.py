"""The SDK's errors: the CLI's own types (cli/errors.py), so a script catches what `dstack` would print, plus
two of waiting. Every one is a DstackError (= CliError), whose message says what to do.

DstackError (CliError)
├── WorkflowError, ProviderError   a workflow file is wrong (file:line:column)
├── NotFoundError                  a run, workflow or artifact that does not exist
├── CoordinatorUnreachable
├── TlsMismatch
├── AuthError                      a bad token, or a role that may not do it
├── RequestRejected, LimitReached
├── RunFailed                      run.wait(check=True): the run ended, and not done
└── WaitTimeout                    run.wait(timeout=...): still not finished
"""

from __future__ import annotations

from dstack.cli.errors import (
    AuthError,
    CliError,
    CoordinatorUnreachable,
    LimitReached,
    NotFoundError,
    ProviderError,
    RequestRejected,
    TlsMismatch,
    WorkflowError,
)

DstackError = CliError


class RunFailed(CliError):
    """The run ended failed or stopped; `status` and `reason` say how."""

    def __init__(self, run_name: str, status: str, message: str) -> None:
        super().__init__(
            f"run {run_name} {status}" + (f": {message}" if message else "") + f" (`dstack logs {run_name}` shows why)"
        )
        self.run_name = run_name
        self.status = status
        self.reason = message


class WaitTimeout(CliError):
    def __init__(self, run_name: str, status: str, timeout: float) -> None:
        super().__init__(f"run {run_name} is still {status} after {timeout:g} s; it goes on (run.stop() stops it)")
        self.run_name = run_name
        self.status = status


__all__ = [
    "AuthError",
    "CliError",
    "CoordinatorUnreachable",
    "DstackError",
    "LimitReached",
    "NotFoundError",
    "ProviderError",
    "RequestRejected",
    "RunFailed",
    "TlsMismatch",
    "WaitTimeout",
    "WorkflowError",
]
