"""The count of open long-lived calls (coordinator/app/streams.py): per user, in all, given back once."""

from __future__ import annotations

import resource

import pytest

from dstack.coordinator.app.streams import StreamLimits, raise_fd_limit
from dstack.coordinator.errors import LimitExceeded


def test_per_user_and_total_limits_name_their_option() -> None:
    limits = StreamLimits(per_user=2, total=3)
    a = [limits.open("alice", "following run r") for _ in range(2)]
    with pytest.raises(LimitExceeded, match=r"user alice already has 2 streams open.*--max-streams-per-user"):
        limits.open("alice", "following run r")
    bob = limits.open("bob", "a tunnel")
    with pytest.raises(LimitExceeded, match=r"^a tunnel refused: the coordinator has 3 streams open.*--max-streams 3"):
        limits.open("carol", "a tunnel")
    assert limits.refused == 2 and limits.open_total == 3
    # Given back once, however often closed (a handler's end and the call's done callback both close).
    a[0].close()
    a[0].close()
    assert limits.open_total == 2 and limits.open_of("alice") == 1
    limits.open("carol", "a tunnel")
    for t in (a[1], bob):
        t.close()
    assert limits.open_of("alice") == 0 and limits.open_total == 1


def test_zero_means_no_limit() -> None:
    limits = StreamLimits(per_user=0, total=0)
    tickets = [limits.open("alice", "x") for _ in range(10_000)]
    assert limits.open_total == 10_000
    for t in tickets:
        t.close()
    assert limits.open_total == 0


def test_the_open_files_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if soft > 64:  # start from a lower soft limit, as a default 1,024 would be
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        now, now_hard = raise_fd_limit()
        assert now_hard == hard
        assert now == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert now == (hard if hard != resource.RLIM_INFINITY else now)
        assert now >= soft
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
