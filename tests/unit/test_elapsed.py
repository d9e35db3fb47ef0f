"""coordinator/elapsed.py: durations from monotonic instants, wall stamps read once."""

from __future__ import annotations

import gc

from dstack.coordinator.elapsed import NS, Instants, Waits


class Clock:
    def __init__(self) -> None:
        self.wall_ns = 1_700_000_000 * NS
        self.mono = 100.0

    def time_ns(self) -> int:
        return self.wall_ns

    def monotonic(self) -> float:
        return self.mono

    async def sleep(self, seconds: float) -> None:  # pragma: no cover - not used here
        self.mono += seconds

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall_ns += int(seconds * NS)


def test_an_instant_marked_or_derived_once_ignores_later_wall_steps() -> None:
    clock = Clock()
    times = Instants(clock)
    times.mark("seen")
    assert times.elapsed_s("unseen", clock.wall_ns - 30 * NS) == 30.0  # derived from its stamp, then kept
    clock.advance(10)
    clock.wall_ns += 3600 * NS  # a step forward
    assert times.elapsed_s("seen", 0) == 10.0
    assert times.elapsed_s("unseen", 0) == 40.0
    clock.wall_ns -= 7200 * NS  # and back
    assert times.elapsed_s("seen", 0) == 10.0
    times.mark("seen")  # a resent report is no new event
    assert times.elapsed_s("seen", 0) == 10.0


def test_a_stamp_in_the_future_reads_as_now_and_keep_forgets_the_rest_but_recent_marks() -> None:
    clock = Clock()
    times = Instants(clock)
    assert times.elapsed_s("ahead", clock.wall_ns + 3600 * NS) == 0.0
    times.mark("old")
    clock.advance(120)
    times.mark("new")
    times.keep([("ahead", 0)])
    clock.wall_ns += 3600 * NS
    assert times.elapsed_s("new", 0) == 0.0  # kept: marked within the grace
    assert times.elapsed_s("old", clock.wall_ns) == 0.0  # forgotten, so derived again from the stamp given


def test_a_job_s_next_attempt_is_a_new_event_and_keep_forgets_an_attempt_that_is_over() -> None:
    clock = Clock()
    times = Instants(clock)
    first = clock.wall_ns
    times.mark("job", first)
    clock.advance(50)
    times.mark("job", first)  # attempt 1's RUNNING resent: no new event
    assert times.elapsed_s("job", first, first) == 50.0
    second = clock.wall_ns
    times.mark("job", second)  # attempt 2 starts: its own instant
    clock.advance(5)
    assert times.elapsed_s("job", second, second) == 5.0
    assert times.at_many([("job", second, second), ("other", 7, clock.wall_ns - 3 * NS)]) == [
        clock.mono - 5,
        clock.mono - 3,
    ]
    clock.advance(120)
    times.keep([("job", first)])  # the rows still name attempt 1 (say): attempt 2's instant goes
    clock.wall_ns += 3600 * NS
    assert times.elapsed_s("job", clock.wall_ns, second) == 0.0  # derived again from the stamp given
    times.keep([("job", second)])  # now the current one is kept
    clock.advance(100)
    assert times.elapsed_s("job", 0, second) == 100.0


def test_a_pass_s_instants_are_never_walked_by_the_collector() -> None:
    """issue 16: keyed by (job, stamp) tuples, the dict of every running job's start was tracked, and
    every full collection followed all of it. Atoms only: never tracked, whatever is asked of it."""
    clock = Clock()
    times = Instants(clock)
    for i in range(100):
        times.mark(f"job-{i}", clock.wall_ns + i)
    times.at_many((f"job-{i}", clock.wall_ns + i, clock.wall_ns) for i in range(50, 150))
    assert times.at(f"job-{200}", clock.wall_ns) <= clock.mono
    times.keep((f"job-{i}", clock.wall_ns + i) for i in range(0, 150, 2))
    assert times._at and times._event
    assert not gc.is_tracked(times._at) and not gc.is_tracked(times._event)
    times.forget("job-0")
    assert not gc.is_tracked(times._at) and not gc.is_tracked(times._event)


def test_waits_finds_the_jobs_that_waited_long_enough_oldest_first_and_forgets_those_gone() -> None:
    clock = Clock()
    waits = Waits(clock)
    waits.load([("b", clock.wall_ns - 50 * NS), ("a", clock.wall_ns - 90 * NS)])
    waits.start("c")
    clock.advance(20)
    waits.start("d")
    clock.wall_ns += 3600 * NS  # changes nothing below
    assert waits.longer_than(20, {"a", "b", "c", "d"}) == ["a", "b", "c"]
    assert waits.longer_than(60, {"b", "c"}) == ["b"]  # a no longer waits: forgotten
    assert waits.waited_s("a") == 0.0 and waits.waited_s("b") == 70.0
    waits.start("b")  # requeued: waits from now
    assert waits.longer_than(1, {"b", "c", "d"}) == ["c"]
    waits.discard(["c"])
    assert waits.longer_than(0, {"b", "c", "d"}) == ["d", "b"]


def test_waits_tidy_forgets_gone_jobs_only_once_they_outnumber_the_waiting_ones_and_keeps_the_order() -> None:
    # The lease loop's preemption check no longer walks the waits while no job may be preempted
    # (Engine._preempt_by_policy), so jobs stopped while waiting are forgotten here instead: not every
    # second (a walk of every entry), only once the gone ones are as many as the waiting ones.
    clock = Clock()
    waits = Waits(clock)
    for i in range(4000):
        waits.start(f"j{i}")
        clock.advance(0.001)
    waiting = {f"j{i}" for i in range(0, 4000, 3)}  # two thirds gone (stopped, failed) without a discard
    waits.tidy(waiting, 2000)  # 4,000 entries, under 2 x 2,000 + 1,000: nothing walked
    assert waits.waited_s("j1") > 0
    waits.tidy(waiting, len(waiting))
    assert waits.waited_s("j1") == 0.0 and waits.waited_s("j3") > 0
    assert waits.longer_than(0, waiting) == [f"j{i}" for i in range(0, 4000, 3)]  # oldest first, as before
