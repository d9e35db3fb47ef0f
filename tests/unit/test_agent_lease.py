"""The agent's lease deadline (agent/lease.py) on a manual clock, and the probe that tells a stopped
coordinator (its port refuses) from one that cannot be reached (a partition drops packets)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from dstack.agent.lease import FencePolicy, LeaseGuard, refused

LEASE_S = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def guard(policy: FencePolicy = FencePolicy(LEASE_S)) -> tuple[LeaseGuard, Clock]:
    clock = Clock()
    g = LeaseGuard(clock)
    g.adopt(policy, hello_sent_at=clock.now)
    return g, clock


def test_the_lease_counts_from_the_send_of_the_last_acknowledged_heartbeat_not_from_its_ack() -> None:
    g, clock = guard()
    assert g.remaining() == LEASE_S  # the hello was the first renewal
    g.sent(1, clock.now + 1)
    g.sent(2, clock.now + 2)
    clock.now += 4.5  # the ack of heartbeat 1 arrives late: the network held it 3.5 s
    g.acked(1)
    assert g.deadline == 101 + LEASE_S  # counted from when it was sent
    assert g.remaining() == 1.5
    g.acked(2)
    assert g.deadline == 102 + LEASE_S


def test_an_ack_of_a_later_heartbeat_covers_the_earlier_and_an_old_or_unknown_ack_never_moves_the_deadline_back() -> (
    None
):
    g, clock = guard()
    for seq in (1, 2, 3):
        g.sent(seq, clock.now + seq)
    g.acked(3)
    assert g.deadline == 103 + LEASE_S
    g.acked(2)  # already covered (its entry went with 3's ack): nothing changes
    g.acked(99)  # never sent on this stream
    assert g.deadline == 103 + LEASE_S


def test_without_acknowledged_renewals_the_deadline_passes() -> None:
    g, clock = guard()
    g.sent(1, clock.now + 1)  # sent, never acknowledged (a partition drops it, or its ack)
    clock.now += LEASE_S + 0.1
    remaining = g.remaining()
    assert remaining is not None and remaining < 0


def test_a_new_stream_forgets_the_sends_of_the_old_one() -> None:
    g, clock = guard()
    g.sent(1, clock.now + 1)
    g.stream_ended()
    clock.now += 3
    g.acked(1)  # the next stream's heartbeat 1, acked before this stream sent one: not the old send time
    assert g.deadline == 100 + LEASE_S


def test_a_refused_connection_counts_as_a_renewal_unless_the_policy_is_strict() -> None:
    g, clock = guard()
    clock.now += 4
    assert g.coordinator_down(clock.now)
    assert g.deadline == 104 + LEASE_S
    strict, clock2 = guard(FencePolicy(LEASE_S, strict=True))
    clock2.now += 4
    assert not strict.coordinator_down(clock2.now)
    assert strict.deadline == 100 + LEASE_S


def test_with_the_policy_off_nothing_is_counted() -> None:
    g, clock = guard(FencePolicy(0.0))
    g.sent(1, clock.now)
    g.acked(1)
    clock.now += 1000
    assert g.remaining() is None
    # A coordinator that turns fencing off at the next hello stops the count at once.
    on, _ = guard()
    on.adopt(FencePolicy(0.0), hello_sent_at=0.0)
    assert on.remaining() is None


def test_the_probe_tells_a_closed_port_from_an_open_one_and_from_a_missing_unix_socket(tmp_path: Path) -> None:
    async def probe() -> None:
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))  # bound, not listening: the kernel answers a connect with RST
        try:
            assert not await refused(f"127.0.0.1:{listening.getsockname()[1]}", 1.0)
            assert await refused(f"127.0.0.1:{closed.getsockname()[1]}", 1.0)
        finally:
            listening.close()
            closed.close()
        assert await refused(f"unix://{tmp_path / 'gone.sock'}", 1.0)
        assert not await refused("no-such-host.invalid:443", 1.0)  # unresolvable: no proof of anything

    asyncio.run(probe())


def test_a_refusal_counts_for_the_published_reconnect_grace_beyond_the_lease_and_strict_counts_none() -> None:
    """A coordinator down at the probe publishes its reconnect grace in the hello ack: every later start gives
    online agents at least that much more (coordinator/restart_lease.py), so the jobs may run that long."""
    g, clock = guard(FencePolicy(LEASE_S, refusal_grace_s=30.0))
    clock.now += 4.0
    assert g.coordinator_down(clock.now)
    assert g.deadline == clock.now + LEASE_S + 30.0
    old, old_clock = guard(FencePolicy(LEASE_S))  # an older coordinator publishes no grace: as before
    old_clock.now += 4.0
    assert old.coordinator_down(old_clock.now) and old.deadline == old_clock.now + LEASE_S
    strict, strict_clock = guard(FencePolicy(LEASE_S, strict=True, refusal_grace_s=30.0))
    strict_clock.now += 4.0
    assert not strict.coordinator_down(strict_clock.now) and strict.deadline == 100 + LEASE_S
