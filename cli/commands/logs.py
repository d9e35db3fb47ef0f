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
class JobPart:
    """A job's lines in one message of the stream that were not received before: as LogLines, then as
    LogBlocks (lines packed: from a coordinator asked for them), in seq order."""

    job_name: str
    lines: list[common_pb2.LogLine]
    blocks: list[common_pb2.LogBlock]

    def texts(self) -> Iterator[str]:
        for ln in self.lines:
            yield ln.text
        for b in self.blocks:
            yield from b.text.split("\n")


@dataclass
class LogBatch:
    """What one message of the log stream brought that was not seen before: each job's new lines."""

    jobs: list[JobPart]
    finished_run: client_pb2.Run | None


def block_last(b: common_pb2.LogBlock) -> int:
    return b.first_seq + max(b.count, 1) - 1


def _new_part(jl: client_pb2.JobLogs, last: int) -> tuple[JobPart, int]:
    """The lines of `jl` after seq `last` (lines at or before the cursor were received already: a
    coordinator that does not know cursors sends the stream from the start again), and the new cursor."""
    lines = list(jl.lines)
    if lines and lines[0].seq <= last:
        lines = [ln for ln in lines if ln.seq > last]
    blocks = list(jl.blocks)
    if blocks and blocks[0].first_seq <= last:
        blocks = [_after_seq(b, last) for b in blocks if block_last(b) > last]
    end = max([last, *(ln.seq for ln in lines[-1:]), *(block_last(b) for b in blocks[-1:])])
    return JobPart(jl.job_name, lines, blocks), end


def _after_seq(b: common_pb2.LogBlock, last: int) -> common_pb2.LogBlock:
    if b.first_seq > last:
        return b
    k = last - b.first_seq + 1
    return common_pb2.LogBlock(
        first_seq=last + 1, count=b.count - k, stream=b.stream, time_ns=b.time_ns, text=b.text.split("\n", k)[k]
    )


def log_batches(client: Client, run_name: str, follow: bool, blocks: bool = False) -> Iterator[LogBatch]:
    """The run's log stream, resumed from the last line received when it breaks (each line once, no gap);
    with follow, until the run finishes (the last batch carries the finished run). `dstack logs`'s and the
    SDK's. With `blocks`, lines may come packed (JobPart.blocks): one object per block, not per line."""
    cursor: dict[str, int] = {}  # job name -> seq of the last line received
    backoff = 0.1
    progress = time.monotonic()
    while True:
        try:
            for resp in client.logs(run_name, follow, cursor, blocks):
                progress, backoff = time.monotonic(), 0.1
                jobs = []
                for jl in resp.jobs:
                    part, cursor[jl.job_name] = _new_part(jl, cursor.get(jl.job_name, 0))
                    jobs.append(part)
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
    for batch in log_batches(client, run.name, follow, blocks=True):
        if batch.jobs:
            before_output()
        for part in batch.jobs:
            job_name = part.job_name
            if job_name not in wanted and node is None and job_name not in labels and (part.lines or part.blocks):
                # A job a provider program added to the run while it was followed (agent/provider_jobs.py):
                # shown too, and from now on every line says its job's name.
                wanted.add(job_name)
                labels[job_name] = job_name
                prefix = True
            if job_name not in wanted:
                continue
            head = f"{labels.get(job_name, job_name)} | " if prefix else ""
            text = []
            for ln in part.lines:
                n = attempt_of(ln.seq)
                if attempt is not None and n != attempt:
                    continue
                if n != shown.get(job_name, 1):
                    text.append(attempt_header(head, n))
                    shown[job_name] = n
                text.append(f"{head}{ln.text}\n")
            for b in part.blocks:  # a block's lines are of one attempt (its seqs are in one attempt's range)
                n = attempt_of(b.first_seq)
                if attempt is not None and n != attempt:
                    continue
                if n != shown.get(job_name, 1):
                    text.append(attempt_header(head, n))
                    shown[job_name] = n
                text.append(f"{head}{b.text.replace(chr(10), chr(10) + head) if head else b.text}\n")
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
