from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dstack.agent.outbox import Outbox, OutboxBounds
from dstack.protos.v1 import agent_pb2, common_pb2

OUT = common_pb2.LOG_STREAM_STDOUT
JS = common_pb2.JobStatus


def texts(msg: agent_pb2.AgentMessage | None) -> list[str]:
    return [ln.text for b in (msg.logs if msg else []) for ln in b.lines]


def make() -> Outbox:
    async def build() -> Outbox:
        return Outbox(max_lines_per_message=3)

    return asyncio.run(build())


def test_lines_are_sent_once_and_resent_after_reconnect_from_the_acked_position() -> None:
    ob = make()
    for i in range(5):
        ob.add_line("j", OUT, f"l{i}")
    assert texts(ob.take()) == ["l0", "l1", "l2"]
    assert texts(ob.take()) == ["l3", "l4"]
    assert ob.take() is None
    ob.ack_logs("j", 2)  # the coordinator stored l0, l1
    ob.on_new_stream({"j": 3})  # ...and after a reconnect says it also has l2
    assert texts(ob.take()) == ["l3", "l4"]


def test_final_update_waits_for_every_line() -> None:
    ob = make()
    for i in range(5):
        ob.add_line("j", OUT, f"l{i}")
    ob.add_update(agent_pb2.JobUpdate(job_id="j", status=JS.JOB_STATUS_DONE))
    first = ob.take()
    assert first is not None and not first.updates
    second = ob.take()
    assert second is not None and [u.status for u in second.updates] == [JS.JOB_STATUS_DONE]


def test_unacked_updates_are_resent_and_acked_ones_forgotten() -> None:
    ob = make()
    ob.add_update(agent_pb2.JobUpdate(job_id="j", status=JS.JOB_STATUS_RUNNING))
    assert ob.take() is not None
    assert ob.take() is None
    ob.on_new_stream({})
    msg = ob.take()
    assert msg is not None and len(msg.updates) == 1
    ob.ack_update("j", JS.JOB_STATUS_RUNNING)
    ob.mark_finished("j")
    assert ob.jobs_with_pending() == set()


def test_sequence_numbers_are_consecutive_per_job() -> None:
    ob = Outbox()
    for i in range(3):
        ob.add_line("a", OUT, str(i))
        ob.add_line("b", OUT, str(i))
    msg = ob.take()
    assert msg is not None
    seqs = {b.job_id: [ln.seq for ln in b.lines] for b in msg.logs}
    assert seqs == {"a": [1, 2, 3], "b": [1, 2, 3]}


def test_messages_are_bounded_in_bytes_but_carry_at_least_one_line() -> None:
    async def build() -> Outbox:
        # Ten batches taken without acknowledgement: more than the batches allowed in flight by default.
        return Outbox(
            max_lines_per_message=5000, max_bytes_per_message=100_000, bounds=OutboxBounds(inflight_batches=20)
        )

    ob = asyncio.run(build())
    for _ in range(10):
        ob.add_line("j", OUT, "x" * 60_000)
    sizes = []
    while (msg := ob.take()) is not None:
        sizes.append(len(texts(msg)))
    assert sizes == [1] * 10  # two would exceed 100 kB
    big = asyncio.run(build())
    big.add_line("j", OUT, "y" * 200_000)
    assert len(texts(big.take())) == 1


def test_no_more_log_batches_than_the_bound_wait_for_acknowledgement_however_small() -> None:
    """The coordinator reads a heartbeat only after every message before it, and holds 16 unhandled: one-line
    batches piling up behind a stalled store would leave heartbeats unread (healthy jobs self-fenced). The
    agent keeps at most `inflight_batches` unacknowledged; the lines that wait go together in the next one."""

    async def build() -> Outbox:
        return Outbox(bounds=OutboxBounds(inflight_batches=3))

    ob = asyncio.run(build())
    for i in range(3):  # one line per batch, as a slowly printing job sends them
        ob.add_line("a" if i < 2 else "b", OUT, f"l{i}")
        assert ob.take_logs() is not None
    ob.add_line("a", OUT, "waits")
    ob.add_line("b", OUT, "waits too")
    assert ob.take_logs() is None  # three batches in flight: the bound
    ob.ack_logs("a", 1)  # the first batch is stored
    msg = ob.take_logs()
    assert texts(msg) == ["waits", "waits too"] and ob.take_logs() is None
    ob.ack_logs("a", 3)  # the second batch (a's line 2) and a's part of the fourth: b's part is not yet
    ob.add_line("a", OUT, "next")
    assert texts(ob.take_logs()) == ["next"]
    assert ob.take_logs() is None
    ob.on_new_stream({"a": 4, "b": 2})  # a new stream, which has everything: nothing is in flight any more
    assert ob.take_logs() is None
    for i in range(3):
        ob.add_line("a", OUT, f"new {i}")
        assert texts(ob.take_logs()) == [f"new {i}"]


def _update(job_id: str, status: common_pb2.JobStatus.ValueType) -> agent_pb2.JobUpdate:
    return agent_pb2.JobUpdate(job_id=job_id, status=status)


def test_no_more_update_messages_than_the_bound_wait_for_acknowledgement_and_those_that_wait_go_together() -> None:
    """Many jobs ending one by one while the coordinator's store stalls sent one message of updates each:
    ahead of the heartbeats on the stream, they filled the coordinator's inbox of 16 and left the heartbeats
    unread (issue 16's known gap). The agent keeps at most `inflight_updates` such messages unacknowledged;
    the updates that wait meanwhile go in one message, once one is acknowledged."""

    async def build() -> Outbox:
        return Outbox(bounds=OutboxBounds(inflight_updates=2))

    ob = asyncio.run(build())
    ob.add_update(_update("a", JS.JOB_STATUS_DONE))
    assert [u.job_id for u in ob.take_control().updates] == ["a"]  # type: ignore[union-attr]
    ob.add_update(_update("b", JS.JOB_STATUS_DONE))
    assert [u.job_id for u in ob.take_control().updates] == ["b"]  # type: ignore[union-attr]
    for job in "cdefg":  # five more jobs end while the first two messages wait
        ob.add_update(_update(job, JS.JOB_STATUS_DONE))
        assert ob.take_control() is None
    ob.ack_update("b", JS.JOB_STATUS_DONE)  # acknowledged out of order: one message less in flight
    assert ob.urgent.is_set()  # the send loop does not wait for a log batch's linger to write them
    msg = ob.take_control()
    assert msg is not None and [u.job_id for u in msg.updates] == list("cdefg")
    assert ob.take_control() is None
    ob.add_update(_update("h", JS.JOB_STATUS_DONE))
    assert ob.take_control() is None  # a's and c..g's messages are in flight
    for job in "cdef":
        ob.ack_update(job, JS.JOB_STATUS_DONE)
    assert ob.take_control() is None  # g's update is not acknowledged yet: that message is still in flight
    ob.ack_update("g", JS.JOB_STATUS_DONE)
    assert [u.job_id for u in ob.take_control().updates] == ["h"]  # type: ignore[union-attr]
    ob.on_new_stream({})  # a new stream: what was unacknowledged is sent again, in one message
    msg = ob.take_control()
    assert msg is not None and sorted(u.job_id for u in msg.updates) == ["a", "h"]


def test_what_the_agent_keeps_in_flight_stays_below_what_the_coordinator_holds_unread() -> None:
    """The two in-flight bounds, and a heartbeat with its inventory, fit in the coordinator's inbox: its
    stream is never left unread because of an honest agent, and heartbeats behind them are read at once."""
    from dstack.coordinator.services.agent import INBOX_MESSAGES

    bounds = OutboxBounds()
    assert bounds.inflight_batches + bounds.inflight_updates + 1 < INBOX_MESSAGES


def test_updates_that_waited_go_in_messages_of_bounded_size_each_job_in_order() -> None:
    """A final update carries its job's environment (a `pip freeze` of up to 256 KiB): the updates of
    hundreds of jobs that ended during a stall must not become one message over gRPC's limit."""

    async def build() -> Outbox:
        return Outbox(max_bytes_per_message=10_000, bounds=OutboxBounds(inflight_updates=100))

    ob = asyncio.run(build())
    for k in range(10):
        ob.add_update(_update(f"j{k}", JS.JOB_STATUS_RUNNING))
        done = _update(f"j{k}", JS.JOB_STATUS_DONE)
        done.message = "x" * 3000
        ob.add_update(done)
    sent: list[tuple[str, int]] = []
    while (msg := ob.take_control()) is not None:
        assert msg.ByteSize() <= 10_000 + 100 or len(msg.updates) == 1
        sent += [(u.job_id, u.status) for u in msg.updates]
    assert len(sent) == 20
    for k in range(10):  # every update once, each job's in order
        assert sent.index((f"j{k}", JS.JOB_STATUS_RUNNING)) < sent.index((f"j{k}", JS.JOB_STATUS_DONE))


UPDATE_STEP = st.one_of(
    st.tuples(
        st.just("add"), st.sampled_from(["a", "b", "c"]), st.sampled_from([JS.JOB_STATUS_RUNNING, JS.JOB_STATUS_DONE])
    ),
    st.tuples(st.just("take")),
    st.tuples(
        st.just("ack"),
        st.sampled_from(["a", "b", "c", "x"]),
        st.sampled_from([JS.JOB_STATUS_RUNNING, JS.JOB_STATUS_DONE]),
    ),
    st.tuples(st.just("reconnect")),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(UPDATE_STEP, max_size=60))
def test_update_messages_in_flight_are_counted_as_a_scan_of_every_message_counts_them(
    steps: list[tuple[Any, ...]],
) -> None:
    """The outbox keeps counters (an acknowledgement costs the same however many updates are in flight);
    the reference is the scan it replaced: a message is in flight while any of its (job, status) pairs has a
    sent update not yet acknowledged. Acknowledgements come for unsent, repeated and unknown updates too."""

    async def main() -> None:
        ob = Outbox(bounds=OutboxBounds(inflight_updates=3))
        ob.on_new_stream({})
        messages: list[tuple[tuple[str, int], ...]] = []

        def unacked(job: str, status: int) -> bool:
            return any(u.status == status and sent for u, sent in ob._updates.get(job, ()))

        for op in steps:
            if op[0] == "add":
                ob.add_update(agent_pb2.JobUpdate(job_id=op[1], status=op[2]))
            elif op[0] == "take":
                unsent = any(not sent for items in ob._updates.values() for _, sent in items)
                msg = ob.take_control()
                assert (msg is None) == (len(messages) >= 3 or not unsent)
                if msg is not None:
                    messages.append(tuple((u.job_id, int(u.status)) for u in msg.updates))
            elif op[0] == "ack":
                ob.ack_update(op[1], op[2])
                messages = [m for m in messages if any(unacked(j, s) for j, s in m)]
            else:
                ob.on_new_stream({})
                messages = []
            assert len(ob._update_msgs) == len(messages)

    asyncio.run(main())
