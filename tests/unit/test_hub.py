"""An agent's outbound messages (coordinator/hub.py `AgentConnection`): in order, merged into one write when
several wait, nothing lost at a close, nothing sent after it."""

from __future__ import annotations

import asyncio

from dstack.coordinator.hub import AgentConnection, AgentHub
from dstack.protos.v1 import agent_pb2


def _ack(seq: int) -> agent_pb2.CoordinatorMessage:
    return agent_pb2.CoordinatorMessage(lease_ack=seq, log_acks=[agent_pb2.LogAck(job_id="j", seq=seq)])


def test_what_waits_goes_in_one_message_in_order_and_a_close_ends_the_stream_after_it() -> None:
    asyncio.run(_what_waits_goes_in_one_message_in_order_and_a_close_ends_the_stream_after_it())


async def _what_waits_goes_in_one_message_in_order_and_a_close_ends_the_stream_after_it() -> None:
    conn = AgentConnection("a")
    conn.send(_ack(1))
    conn.send(_ack(2))
    first = await conn.next_batch()
    assert first is not None and [a.seq for a in first.log_acks] == [1, 2] and first.lease_ack == 2
    conn.send(_ack(3))
    conn.close()
    conn.send(_ack(4))  # after the close: dropped
    last = await conn.next_batch()
    assert last is not None and [a.seq for a in last.log_acks] == [3]
    assert await asyncio.wait_for(conn.next_batch(), 5) is None
    assert await asyncio.wait_for(conn.next_batch(), 5) is None  # and so on: a writer asking again ends too


def test_a_waiting_writer_is_woken_by_a_send_and_by_a_close() -> None:
    asyncio.run(_a_waiting_writer_is_woken_by_a_send_and_by_a_close())


async def _a_waiting_writer_is_woken_by_a_send_and_by_a_close() -> None:
    conn = AgentConnection("a")
    writer = asyncio.ensure_future(conn.next_batch())
    await asyncio.sleep(0)
    assert not writer.done()
    conn.send(_ack(7))
    got = await asyncio.wait_for(writer, 5)
    assert got is not None and got.lease_ack == 7
    writer = asyncio.ensure_future(conn.next_batch())
    await asyncio.sleep(0)
    conn.close()
    assert await asyncio.wait_for(writer, 5) is None


def test_a_cancelled_writer_leaves_the_connection_usable() -> None:
    asyncio.run(_a_cancelled_writer_leaves_the_connection_usable())


async def _a_cancelled_writer_leaves_the_connection_usable() -> None:
    conn = AgentConnection("a")
    writer = asyncio.ensure_future(conn.next_batch())
    await asyncio.sleep(0)
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    conn.send(_ack(1))  # wakes no one: nothing raises
    got = await conn.next_batch()
    assert got is not None and got.lease_ack == 1


def test_a_newer_stream_of_the_same_agent_closes_the_older_one() -> None:
    asyncio.run(_a_newer_stream_of_the_same_agent_closes_the_older_one())


async def _a_newer_stream_of_the_same_agent_closes_the_older_one() -> None:
    hub = AgentHub()
    old = hub.attach("a")
    new = hub.attach("a")
    assert old.closed and not new.closed
    assert hub.send("a", _ack(1))
    assert await asyncio.wait_for(old.next_batch(), 5) is None
    got = await new.next_batch()
    assert got is not None and got.lease_ack == 1
    hub.detach(old)  # the old stream's end does not drop the new one
    assert hub.connected_ids() == {"a"}
