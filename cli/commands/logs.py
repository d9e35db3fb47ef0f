"""Printing a run's log stream: raw lines for one job, `job | line` for several."""

from __future__ import annotations

import sys
from collections.abc import Callable

from dstack.cli.client import Client
from dstack.protos.v1 import client_pb2


def print_logs(
    client: Client, run: client_pb2.Run, follow: bool, before_output: Callable[[], None] = lambda: None
) -> client_pb2.Run | None:
    """Prints every line of the run; with follow, until it finishes. Returns the finished run.
    `before_output` is called before each batch of lines (to clear a status line first)."""
    prefix = len(run.jobs) > 1
    out = sys.stdout
    for resp in client.logs(run.name, follow):
        if resp.jobs:
            before_output()
        for jl in resp.jobs:
            head = f"{jl.job_name} | " if prefix else ""
            out.write("".join(f"{head}{ln.text}\n" for ln in jl.lines))
        out.flush()
        if resp.HasField("finished_run"):
            return resp.finished_run
    return None


def logs_command(run_name: str, follow: bool) -> None:
    from dstack.cli.session import connect

    client = connect()
    run = client.get_run(run_name)
    print_logs(client, run, follow)
