"""The SDK's errors: the CLI's own types (cli/errors.py), so a script catches what `dstack` would print, plus
two of waiting. Every one is a DstackError (= CliError), whose message says what to do.

DstackError (CliError)
├── WorkflowError, ProviderError   a workflow file is wrong (file:line:column)
├── NotFoundError                  a run, workflow or artifact that does not exist
├── CoordinatorUnreachable
├── TlsMismatch
├── AuthError                      a bad token, or a role that may not do it
├── RequestRejected, LimitReached
│   └── PartlySubmitted            runs.submit_many: some runs submitted, some not (which, and why)
├── RunFailed                      run.wait(check=True): the run ended, and not done
└── WaitTimeout                    run.wait(timeout=...): still not finished
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from dstack.api.runs import Run

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


class PartlySubmitted(RequestRejected):
    """`runs.submit_many` submitted some of the runs and not others. `runs[i]` is the run submitted for
    item i of `args`, or None; `reasons[i]` says why not ("" for a submitted one): refused by the
    coordinator (a limit, an unknown tag), not stored (a fault undid its batch: sending it again is safe),
    not sent (an earlier batch failed), or unknown (the call failed on the way: `dstack ps` tells)."""

    def __init__(self, runs: Sequence[Run | None], reasons: Sequence[str]) -> None:
        self.runs = list(runs)
        self.reasons = list(reasons)
        missing = [i for i, r in enumerate(self.runs) if r is None]
        done = [r.name for r in self.runs if r is not None]
        first = missing[0]
        more = f"; and {len(missing) - 1} more (error.reasons)" if len(missing) > 1 else ""
        shown = ", ".join(done[:5]) + (", ..." if len(done) > 5 else "")
        super().__init__(
            f"{len(done)} of {len(self.runs)} runs submitted{f' ({shown})' if done else ''}, {len(missing)} not:"
            f" item {first} of args: {self.reasons[first]}{more}. The submitted runs are in error.runs"
        )

    @property
    def submitted(self) -> list[Run]:
        return [r for r in self.runs if r is not None]


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
    "PartlySubmitted",
    "ProviderError",
    "RequestRejected",
    "RunFailed",
    "TlsMismatch",
    "WaitTimeout",
    "WorkflowError",
]
