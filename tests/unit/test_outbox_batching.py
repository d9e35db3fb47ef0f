"""The agent's log batching is clocked by acknowledgements, not by a timer (agent/outbox.py, take_logs).

`dstack logs -f` lag: a line written alone goes at once; lines read while a batch is being stored go
together when its acknowledgement comes (one batch per round trip, not one per read of the job's output),
and a full batch goes without waiting for either. The send loop (agent/connection.py) is woken by what
makes a batch takeable (the line itself, the acknowledgement), never by each read that cannot go yet.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from dstack.agent import outbox as outbox_module
from dstack.agent.outbox import SHORT_BATCH_GAP_S, SHORT_BATCHES_INFLIGHT, Outbox, OutboxBounds
from dstack.protos.v1 import agent_pb2, common_pb2

OUT = common_pb2.LOG_STREAM_STDOUT


def texts(msg: agent_pb2.AgentMessage | None) -> list[str]:
    return [t for b in (msg.logs if msg else []) for blk in b.blocks for t in blk.text.split("\n")]


def outbox(**kwargs: object) -> Outbox:
    async def build() -> Outbox:
        ob = Outbox(short_batches_inflight=SHORT_BATCHES_INFLIGHT, **kwargs)  # type: ignore[arg-type]
        ob.blocks = True
        return ob

    return asyncio.run(build())


def test_a_line_written_alone_wakes_the_sender_and_goes_at_once() -> None:
    ob = outbox()
    ob.wake.clear()
    ob.add_line("j", OUT, "alone")
    assert ob.wake.is_set()  # the line itself wakes the send loop: no timer, no batch to fill
    assert texts(ob.take_logs()) == ["alone"]


def test_lines_read_while_a_batch_is_unacknowledged_go_together_when_its_ack_comes() -> None:
    ob = outbox()
    ob.add_line("j", OUT, "first")
    assert texts(ob.take_logs()) == ["first"]
    ob.wake.clear()
    for i in range(3):  # three reads of the job's output while the first batch is being stored
        ob.add_line("j", OUT, f"read {i}")
        assert not ob.wake.is_set()  # no wake-up per read: nothing may go yet
        assert ob.take_logs() is None
    ob.ack_logs("j", 1)
    assert ob.wake.is_set()  # the acknowledgement is what lets the next batch go
    assert texts(ob.take_logs()) == ["read 0", "read 1", "read 2"]  # one batch, not three
    assert ob.take_logs() is None


def test_a_full_batch_goes_without_waiting_for_the_ack_and_the_in_flight_bounds_still_hold() -> None:
    ob = outbox(max_lines_per_message=4, bounds=OutboxBounds(inflight_batches=2))
    ob.add_line("j", OUT, "short")
    assert texts(ob.take_logs()) == ["short"]
    ob.wake.clear()
    ob.add_lines("j", OUT, [f"full {i}" for i in range(4)])
    assert ob.wake.is_set()  # a full batch is worth a wake-up while the short one is in flight
    assert texts(ob.take_logs()) == [f"full {i}" for i in range(4)]
    ob.add_lines("j", OUT, [f"more {i}" for i in range(4)])
    assert ob.take_logs() is None  # two batches in flight: the bound (inflight_batches) holds, full or not
    ob.ack_logs("j", 1)
    assert texts(ob.take_logs()) == [f"more {i}" for i in range(4)]


def test_an_outbox_without_the_gating_sends_short_batches_back_to_back_as_before() -> None:
    async def build() -> Outbox:
        ob = Outbox()
        ob.blocks = True
        return ob

    ob = asyncio.run(build())
    ob.add_line("j", OUT, "a")
    assert texts(ob.take_logs()) == ["a"]
    ob.add_line("j", OUT, "b")
    assert texts(ob.take_logs()) == ["b"]


def test_the_gap_bounds_how_often_short_batches_go_but_never_holds_a_line_after_quiet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(outbox_module, "time", SimpleNamespace(monotonic=lambda: now[0], time_ns=time.time_ns))
    ob = outbox(short_batch_gap_s=SHORT_BATCH_GAP_S)
    ob.add_line("j", OUT, "a")
    assert texts(ob.take_logs()) == ["a"]
    ob.ack_logs("j", 1)
    ob.add_line("j", OUT, "b")  # acknowledged already, but within the gap after "a"
    assert ob.take_logs() is None
    assert ob.short_batch_at() == pytest.approx(100.0 + SHORT_BATCH_GAP_S)  # the send loop wakes then
    now[0] += SHORT_BATCH_GAP_S
    assert texts(ob.take_logs()) == ["b"]
    ob.ack_logs("j", 2)
    now[0] += 60  # quiet: the next line goes at once
    ob.wake.clear()
    ob.add_line("j", OUT, "after quiet")
    assert ob.wake.is_set() and ob.short_batch_at() is None
    assert texts(ob.take_logs()) == ["after quiet"]
