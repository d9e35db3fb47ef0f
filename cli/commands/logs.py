"""Printing a run's log stream: raw lines for one job, `job | line` for several.

A stream that breaks (connection reset, coordinator restarting) is resumed from the cursor of the
last line printed: every line is printed once, with no gap.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dstack.cli.client import Client
from dstack.cli.errors import CoordinatorUnreachable, NotFoundError
from dstack.protos.v1 import client_pb2, common_pb2

# How long a broken stream is retried without any progress before the error is shown.
RESUME_WINDOW_S = 60.0


# A line's attempt is in its seq: attempt N's lines have seqs ((N - 1) << 32) + 1, ... (coordinator/attempts.py).
SEQ_BITS = 32


def attempt_of(seq: int) -> int:
    return (seq >> SEQ_BITS) + 1


def attempt_header(head: str, attempt: int) -> str:
    return f"{head}── attempt {attempt} ──\n"


@dataclass
class LogBatch:
    """What one message of the log stream brought that was not seen before: each job's new lines."""

    jobs: list[tuple[str, list[common_pb2.LogLine]]]
    finished_run: client_pb2.Run | None


def log_batches(client: Client, run_name: str, follow: bool) -> Iterator[LogBatch]:
    """The run's log stream, resumed from the last line received when it breaks (each line once, no gap);
    with follow, until the run finishes (the last batch carries the finished run). `dstack logs`'s and the
    SDK's."""
    cursor: dict[str, int] = {}  # job name -> seq of the last line received
    backoff = 0.1
    progress = time.monotonic()
    while True:
        try:
            for resp in client.logs(run_name, follow, cursor):
                progress, backoff = time.monotonic(), 0.1
                jobs = []
                for jl in resp.jobs:
                    last = cursor.get(jl.job_name, 0)
                    # Lines at or before the cursor were received already (a coordinator that does not
                    # know cursors sends the stream from the start again).
                    jobs.append((jl.job_name, [ln for ln in jl.lines if ln.seq > last]))
                    if jl.lines:
                        cursor[jl.job_name] = max(last, jl.lines[-1].seq)
                finished = resp.finished_run if resp.HasField("finished_run") else None
                yield LogBatch(jobs, finished)
                if finished is not None:
                    return
            return
        except CoordinatorUnreachable:
            if time.monotonic() - progress > RESUME_WINDOW_S:
                raise
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)


def print_logs(
    client: Client,
    run: client_pb2.Run,
    follow: bool,
    before_output: Callable[[], None] = lambda: None,
    attempt: int | None = None,
    node: int | None = None,
) -> client_pb2.Run | None:
    """Prints every line of the run (of one attempt of each job, if `attempt`); with follow, until it
    finishes. A job with several attempts gets a header line before each attempt's lines. Returns the
    finished run. `before_output` is called before each batch of lines (to clear a status line first).
    `node`: only the lines of that node of a multi-node job (docs/multinode.md)."""
    labels = job_labels(run)
    wanted = set(labels)
    if node is not None:
        wanted = {j.job_name for j in run.jobs if j.spec.gang and j.spec.node_rank == node}
        if not wanted:
            raise NotFoundError(f"run {run.name} has no node {node}: {_nodes_of(run)}")
    prefix = len(wanted) > 1
    out = sys.stdout
    # The attempt whose lines each job printed last; 0 where a header is due before attempt 1's.
    shown = {j.job_name: (0 if j.attempt > 1 else 1) for j in run.jobs}
    for batch in log_batches(client, run.name, follow):
        if batch.jobs:
            before_output()
        for job_name, lines in batch.jobs:
            if job_name not in wanted and node is None and job_name not in labels and lines:
                # A job a provider program added to the run while it was followed (agent/provider_jobs.py):
                # shown too, and from now on every line says its job's name.
                wanted.add(job_name)
                labels[job_name] = job_name
                prefix = True
            if job_name not in wanted:
                continue
            head = f"{labels.get(job_name, job_name)} | " if prefix else ""
            text = []
            for ln in lines:
                n = attempt_of(ln.seq)
                if attempt is not None and n != attempt:
                    continue
                if n != shown.get(job_name, 1):
                    text.append(attempt_header(head, n))
                    shown[job_name] = n
                text.append(f"{head}{ln.text}\n")
            out.write("".join(text))
        out.flush()
        if batch.finished_run is not None:
            return batch.finished_run
    return None


def job_labels(run: client_pb2.Run) -> dict[str, str]:
    """job name -> the prefix of its lines: `node K` for the members of a run's one multi-node job,
    else the job's name (`train-node1`, the members' names, where the run has other jobs too)."""
    gangs = {j.spec.gang for j in run.jobs}
    if len(gangs) == 1 and "" not in gangs:
        return {j.job_name: f"node {j.spec.node_rank}" for j in run.jobs}
    return {j.job_name: j.job_name for j in run.jobs}


def _nodes_of(run: client_pb2.Run) -> str:
    ranks = sorted(j.spec.node_rank for j in run.jobs if j.spec.gang)
    return f"its nodes are {', '.join(map(str, ranks))}" if ranks else "it is not a multi-node run"


def logs_command(run_name: str, follow: bool, attempt: int | None = None, node: int | None = None) -> None:
    from dstack.cli.session import connect

    client = connect()
    run = client.get_run(run_name)
    print_logs(client, run, follow, attempt=attempt, node=node)
