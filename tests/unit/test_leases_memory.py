"""The in-memory leases (coordinator/leases.py): a stream we stopped reading holds its agent's lease, and a
hello starts the agent's silence afresh."""

from __future__ import annotations

from dstack.coordinator.leases import Leases

LEASE_S = 5.0


def test_a_held_agent_is_not_expired_however_long_we_do_not_read_it_and_its_lease_starts_afresh_after() -> None:
    """The coordinator's store stalls; an agent's messages fill its inbox and the stream is not read: its
    heartbeats wait unread in the transport. Our backlog is not its silence: before, the lease check that
    came once the store was free found every such lease run out and marked healthy agents lost."""
    leases = Leases()
    leases.grant("a", LEASE_S)
    leases.grant("b", LEASE_S)
    leases.hold("a")
    leases.hold("a")  # two of its streams (an old one not yet closed): both must let go
    assert leases.expired(60.0) == ["b"]
    assert not leases.still_expired("a", 60.0) and leases.still_expired("b", 60.0)
    leases.release("a", 60.0, 60.0 + LEASE_S)
    assert leases.expired(61.0) == ["b"]  # still held by its other stream
    leases.release("a", 61.0, 61.0 + LEASE_S)
    assert not leases.backlogged("a")
    assert leases.expired(61.0 + LEASE_S - 0.1) == ["b"]  # a fresh lease from when it was read again
    assert sorted(leases.expired(61.0 + LEASE_S + 0.1)) == ["a", "b"]  # really gone: lost a lease later


def test_a_release_gives_no_lease_to_an_agent_that_holds_none() -> None:
    leases = Leases()
    leases.hold("gone")
    leases.release("gone", 10.0, 10.0 + LEASE_S)
    assert not leases.holds("gone") and not leases.backlogged("gone")


def test_the_longest_silence_leaves_out_a_reconnect_because_a_hello_counts_as_heard() -> None:
    """`max_gap_s` (the coordinator's "longest silence" figure) counted an agent's reconnect time: a hello did
    not reset when it was last heard from, so an agent that reconnected after 12 s showed a 12 s silence."""
    leases = Leases()
    leases.grant("a", LEASE_S, heard_at=0.0)
    leases.renew("a", 1.0, 1.0 + LEASE_S, 1)
    leases.grant("a", 13.0 + LEASE_S, heard_at=13.0)  # its new stream's hello, 12 s later
    leases.renew("a", 13.5, 13.5 + LEASE_S, 2)
    assert leases.max_gap_s == 1.0
    leases.renew("a", 16.5, 16.5 + LEASE_S, 3)  # a real silence is still counted
    assert leases.max_gap_s == 3.0


def test_a_hello_after_a_restart_keeps_the_longer_restart_lease() -> None:
    """Agents refused while the coordinator was down count on the restart lease (coordinator/restart_lease.py):
    a hello soon after the start must not cut it to one lease from the hello."""
    leases = Leases()
    leases.grant("a", until=140.0)  # the start: lease + margin + grace
    leases.grant("a", until=20.0, heard_at=10.0)  # its hello at 10 s
    assert not leases.expired(100.0)
    assert leases.expired(141.0) == ["a"]
    leases.forget("a")  # lost: its next hello starts a lease afresh
    leases.grant("a", until=160.0, heard_at=150.0)
    assert not leases.expired(159.0)
