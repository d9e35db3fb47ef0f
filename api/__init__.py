"""dstack's Python API: submit runs, wait for them, read their logs and artifacts, from a notebook or a pipeline.

    from dstack.api import Client

    client = Client()  # the coordinator `dstack config` set (else the embedded local one), as the CLI uses
    run = client.runs.submit("train", repo=".", variables={"epochs": "3"})
    for line in run.logs(follow=True):
        print(line)
    run.wait(check=True)  # raises RunFailed unless it is done
    run.artifacts.download(to="out")

It speaks gRPC to the coordinator over one channel, with the CLI's configuration, TLS and tokens; its errors
are the CLI's (dstack.api.errors). docs/sdk.md has the whole of it.
"""

from __future__ import annotations

from dstack.api.client import Client
from dstack.api.errors import (
    AuthError,
    CliError,
    CoordinatorUnreachable,
    DstackError,
    LimitReached,
    NotFoundError,
    PartlySubmitted,
    RequestRejected,
    RunFailed,
    TlsMismatch,
    WaitTimeout,
    WorkflowError,
)
from dstack.api.runs import Artifact, Artifacts, Run, Runs, RunStatus

__all__ = [
    "Artifact",
    "Artifacts",
    "AuthError",
    "CliError",
    "Client",
    "CoordinatorUnreachable",
    "DstackError",
    "LimitReached",
    "NotFoundError",
    "PartlySubmitted",
    "RequestRejected",
    "Run",
    "RunFailed",
    "RunStatus",
    "Runs",
    "TlsMismatch",
    "WaitTimeout",
    "WorkflowError",
]
