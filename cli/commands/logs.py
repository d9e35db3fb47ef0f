"""Printing a run's log stream: raw lines for one job, `job | line` for several.

A stream that breaks (connection reset, coordinator restarting) is resumed from the cursor of the
last line printed: every line is printed once, with no gap.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from dstack.cli.client import Client
from dstack.cli.errors import CoordinatorUnreachable
from dstack.protos.v1 import client_pb2

# How long a broken stream is retried without any progress before the error is shown.
RESUME_WINDOW_S = 60.0


def print_logs(
    client: Client, run: client_pb2.Run, follow: bool, before_output: Callable[[], None] = lambda: None
) -> client_pb2.Run | None:
    """Prints every line of the run; with follow, until it finishes. Returns the finished run.
    `before_output` is called before each batch of lines (to clear a status line first)."""
    prefix = len(run.jobs) > 1
    out = sys.stdout
    cursor: dict[str, int] = {}  # job name -> seq of the last line printed
    backoff = 0.1
    progress = time.monotonic()
    while True:
        try:
            for resp in client.logs(run.name, follow, cursor):
                progress, backoff = time.monotonic(), 0.1
                if resp.jobs:
                    before_output()
                for jl in resp.jobs:
                    head = f"{jl.job_name} | " if prefix else ""
                    last = cursor.get(jl.job_name, 0)
                    # Lines at or before the cursor were printed already (a coordinator that does not
                    # know cursors sends the stream from the start again).
                    out.write("".join(f"{head}{ln.text}\n" for ln in jl.lines if ln.seq > last))
                    if jl.lines:
                        cursor[jl.job_name] = max(last, jl.lines[-1].seq)
                out.flush()
                if resp.HasField("finished_run"):
                    return resp.finished_run
            return None
        except CoordinatorUnreachable:
            if time.monotonic() - progress > RESUME_WINDOW_S:
                raise
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)


def logs_command(run_name: str, follow: bool) -> None:
    from dstack.cli.session import connect

    client = connect()
    run = client.get_run(run_name)
    print_logs(client, run, follow)
