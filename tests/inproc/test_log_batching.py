"""A real agent's log batches are clocked by the coordinator's acknowledgements, not by a timer.

`dstack logs -f` lag (issue 16): the agent used to hold each short batch's successor for a fixed 5 ms and
keep up to 8 small batches in flight. Now a line goes as soon as nothing is unacknowledged, and what the
job prints while a batch is being stored goes in one batch when its acknowledgement comes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dstack.agent.connection import Agent
from dstack.coordinator.engine import Engine
from dstack.protos.v1 import agent_pb2
from tests.inproc.factories import GatedRuntime, coordinator, job_ids, job_spec, real_agent, submit_run, wait_until

pytestmark = pytest.mark.inproc


async def test_what_a_job_prints_while_its_last_batch_is_stored_goes_in_one_batch_on_the_ack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[list[str]] = []  # the lines of each log batch the coordinator received, in order
    hold = asyncio.Event()  # the store of the batch after the job's first line waits for this
    on_message = Engine.on_message

    async def gated(self: Engine, agent_id: str, msg: agent_pb2.AgentMessage, **kw: Any) -> Any:
        texts = [t for b in msg.logs for blk in b.blocks for t in blk.text.split("\n")]
        texts += [ln.text for b in msg.logs for ln in b.lines]
        if texts:
            batches.append(texts)
            if "first" in texts:
                await hold.wait()
        return await on_message(self, agent_id, msg, **kw)

    monkeypatch.setattr(Engine, "on_message", gated)
    runtime = GatedRuntime()
    async with coordinator(tmp_path) as h, real_agent(h, runtime=runtime) as agent:
        run = await submit_run(h, job_spec("main", "printer"))
        job_id = job_ids(run)["main"]
        proc = await runtime.started(job_id)
        await h.wait_logs(run.name, ["printer"])
        proc.write(b"first\n")  # alone: goes at once, no timer to wait out
        await wait_until(lambda: _sent(batches, "first"), "the lone line sent")
        for i in range(3):  # three reads of the job's output while "first" is being stored
            text = f"while stored {i}"
            proc.write(f"{text}\n".encode())
            await wait_until(lambda text=text: _read_by(agent, job_id, text), f"{text!r} read")  # type: ignore[misc]
        assert not any(len(b) > 1 or b[0].startswith("while") for b in batches)  # held: none sent yet
        hold.set()
        want = ["printer", "first", *(f"while stored {i}" for i in range(3))]
        await h.wait_logs(run.name, want)
        proc.exit(0)
        assert ["first"] in batches
        assert ["while stored 0", "while stored 1", "while stored 2"] in batches  # one batch, not three


async def _sent(batches: list[list[str]], text: str) -> bool:
    return any(text in b for b in batches)


async def _read_by(agent: Agent, job_id: str, text: str) -> bool:
    """Whether the agent has read `text` off the job's output (it is in its outbox)."""
    jl = agent.outbox._logs.get(job_id)
    return jl is not None and any(text in b.text.split("\n") for b in jl.mem)
