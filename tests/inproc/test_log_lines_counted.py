"""`dstack_log_lines` counts a message's lines once, even when the message is handled again because the
store refused a later write of it (agent_stream.Session.receive_stored: the coordinator's disk full)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dstack.protos.v1 import agent_pb2, common_pb2
from tests.inproc.factories import JS, coordinator, job_ids, job_spec, sim_agent, submit_run

pytestmark = pytest.mark.inproc


async def test_lines_stored_before_a_refused_update_are_counted_once(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h, "sim") as agent:
        run = await submit_run(h, job_spec("main"))
        job_id = job_ids(run)["main"]
        await agent.wait_assignments(1)
        store, metrics = h.coordinator.engine.store, h.coordinator.engine.metrics
        refusals = 0

        def refusing_once(write: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                nonlocal refusals
                if refusals == 0:
                    refusals += 1
                    e = sqlite3.OperationalError("database or disk is full")
                    e.sqlite_errorname = "SQLITE_FULL"  # as SQLite sets it
                    raise e
                return write(*args, **kwargs)

            return call

        # The lines are stored, then the update's write is refused: the whole message is handled again.
        for name in ("apply_job_updates", "apply_job_updates_many"):
            setattr(store, name, refusing_once(getattr(store, name)))
        lines = [common_pb2.LogLine(seq=s, stream=common_pb2.LOG_STREAM_STDOUT, text=f"l{s}") for s in (1, 2, 3)]
        await agent.send(
            agent_pb2.AgentMessage(
                logs=[agent_pb2.LogBatch(job_id=job_id, lines=lines)],
                updates=[agent_pb2.JobUpdate(job_id=job_id, status=JS.JOB_STATUS_RUNNING)],
            )
        )
        await agent.until(lambda: (job_id, JS.JOB_STATUS_RUNNING) in agent.update_acks(), "the update's ack")
        assert refusals == 1, "the store never refused the update: the attack did not happen"
        assert [t for _, _, t in await h.logs(run.name)] == ["l1", "l2", "l3"]
        assert metrics.log_lines._value.get() == 3
