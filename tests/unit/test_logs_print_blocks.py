"""`dstack logs` printing lines that come packed (JobLogs.blocks): the same output as the same lines one
LogLine each, with job prefixes, attempt headers, and lines a resumed stream repeats printed once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from dstack.cli.commands.logs import print_logs
from dstack.protos.v1 import client_pb2

A2 = 1 << 32  # attempt 2's first seq is A2 + 1


def run_of(*jobs: tuple[str, int]) -> client_pb2.Run:
    run = client_pb2.Run(name="r")
    for name, attempt in jobs:
        run.jobs.add(job_name=name, attempt=attempt)
    return run


class FakeClient:
    """Answers StreamLogs with the given responses (as a coordinator would, blocks or not)."""

    def __init__(self, responses: list[client_pb2.StreamLogsResponse]) -> None:
        self.responses = responses
        self.asked_blocks: list[bool] = []

    def logs(self, name: str, follow: bool, after: Any = None, blocks: bool = False) -> Iterator[Any]:
        self.asked_blocks.append(blocks)
        return iter(self.responses)


def as_lines(resp: client_pb2.StreamLogsResponse) -> client_pb2.StreamLogsResponse:
    """The same response with each block as LogLines (what a client that does not read blocks gets)."""
    out = client_pb2.StreamLogsResponse()
    out.CopyFrom(resp)
    for jl in out.jobs:
        for b in jl.blocks:
            for i, text in enumerate(b.text.split("\n")):
                jl.lines.add(seq=b.first_seq + i, stream=b.stream, time_ns=b.time_ns, text=text)
        del jl.blocks[:]
    return out


def responses() -> list[client_pb2.StreamLogsResponse]:
    first = client_pb2.StreamLogsResponse()
    first.jobs.add(job_name="a").blocks.add(first_seq=1, count=2, text="a1\na2")
    b = first.jobs.add(job_name="b")
    b.blocks.add(first_seq=1, count=1, text="b1")
    b.blocks.add(first_seq=A2 + 1, count=2, text="b2-1\n")  # attempt 2: a header first; an empty line
    # A resumed stream from a coordinator that ignores cursors repeats lines: a block cut at the cursor.
    again = client_pb2.StreamLogsResponse()
    again.jobs.add(job_name="a").blocks.add(first_seq=1, count=3, text="a1\na2\na3")
    again.finished_run.CopyFrom(run_of(("a", 1), ("b", 2)))
    return [first, again]


def test_blocks_print_as_the_same_lines_would(capsys: pytest.CaptureFixture[str]) -> None:
    run = run_of(("a", 1), ("b", 2))
    client = FakeClient(responses())
    print_logs(client, run, follow=True)  # type: ignore[arg-type]
    packed = capsys.readouterr().out
    assert client.asked_blocks == [True]
    print_logs(FakeClient([as_lines(r) for r in responses()]), run, follow=True)  # type: ignore[arg-type]
    assert packed == capsys.readouterr().out
    assert packed.splitlines() == [
        "a | a1",
        "a | a2",
        "b | ── attempt 1 ──",  # a job with several attempts: a header before each one's lines
        "b | b1",
        "b | ── attempt 2 ──",
        "b | b2-1",
        "b | ",
        "a | a3",
    ]


def test_one_job_prints_a_block_as_its_lines(capsys: pytest.CaptureFixture[str]) -> None:
    resp = client_pb2.StreamLogsResponse()
    resp.jobs.add(job_name="a").blocks.add(first_seq=1, count=3, text="x\ny\nz")
    resp.finished_run.CopyFrom(run_of(("a", 1)))
    print_logs(FakeClient([resp]), run_of(("a", 1)), follow=True)  # type: ignore[arg-type]
    assert capsys.readouterr().out == "x\ny\nz\n"
