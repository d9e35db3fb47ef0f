"""Lines packed in LogBlocks between a real agent, the coordinator and clients, across versions: an agent
sends blocks only to a coordinator that says it takes them (HelloAck.log_blocks), LogLines otherwise; a
client gets blocks only if it asks (StreamLogsRequest.blocks), LogLines otherwise; every way, the same
lines, once, in order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dstack.coordinator.engine import Engine
from dstack.protos.v1 import agent_pb2, client_pb2
from tests.inproc.factories import GatedRuntime, Harness, coordinator, job_ids, job_spec, real_agent, submit_run

pytestmark = pytest.mark.inproc

LINES = [f"line {i} {'é' * (i % 3)}" for i in range(1, 2001)]


async def read(h: Harness, run_name: str, blocks: bool) -> tuple[list[tuple[int, str]], int]:
    """(seq, text) of every line as a client asking for blocks or not reads them, and how many blocks came."""
    out: list[tuple[int, str]] = []
    n_blocks = 0
    req = client_pb2.StreamLogsRequest(run_name=run_name, blocks=blocks)
    async for resp in h.client.StreamLogs(req, metadata=h.meta):
        for jl in resp.jobs:
            out += [(ln.seq, ln.text) for ln in jl.lines]
            for b in jl.blocks:
                n_blocks += 1
                out += [(b.first_seq + i, t) for i, t in enumerate(b.text.split("\n"))]
    return out, n_blocks


@pytest.mark.parametrize("takes_blocks", [True, False])
async def test_the_same_lines_reach_every_client_whether_the_coordinator_takes_blocks_or_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, takes_blocks: bool
) -> None:
    kinds: list[str] = []  # what the agent's batches carried
    on_hello, on_message = Engine.on_hello, Engine.on_message

    async def hello(self: Engine, agent_id: str, msg: agent_pb2.AgentMessage) -> agent_pb2.CoordinatorMessage:
        reply = await on_hello(self, agent_id, msg)
        if not takes_blocks:  # a coordinator from before blocks: its HelloAck has no such field
            reply.hello_ack.ClearField("log_blocks")
        return reply

    async def message(
        self: Engine, agent_id: str, msg: agent_pb2.AgentMessage, **kw: Any
    ) -> agent_pb2.CoordinatorMessage | None:
        kinds.extend("blocks" if b.blocks else "lines" for b in msg.logs)
        return await on_message(self, agent_id, msg, **kw)

    monkeypatch.setattr(Engine, "on_hello", hello)
    monkeypatch.setattr(Engine, "on_message", message)
    runtime = GatedRuntime()
    async with coordinator(tmp_path) as h, real_agent(h, runtime=runtime):
        run = await submit_run(h, job_spec("main", "printer"))
        proc = await runtime.started(job_ids(run)["main"])
        data = "".join(f"{t}\r\n" for t in LINES).encode()  # CRLF endings: the CR goes
        for at in range(0, len(data), 7001):  # reads that cut lines and characters anywhere
            proc.write(data[at : at + 7001])
        proc.exit(0)
        want = ["printer", *LINES]
        await h.wait_logs(run.name, want)
        as_lines, no_blocks = await read(h, run.name, blocks=False)
        packed, n_blocks = await read(h, run.name, blocks=True)
        assert as_lines == packed == list(enumerate(want, start=1))
        assert no_blocks == 0
        assert set(kinds) == {"blocks" if takes_blocks else "lines"}
        # From an agent that sends blocks, a client that reads them gets a few, not a message per line.
        assert (0 < n_blocks < 100) if takes_blocks else n_blocks == 0
