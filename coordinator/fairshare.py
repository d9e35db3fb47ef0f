"""Fair-share arithmetic: what a job costs, and usage that decays with a half-life. Pure, no I/O.

Usage is counted in GPU-seconds. A CPU-only job is charged CPU-seconds divided by CPUS_PER_GPU, so
that both are comparable: a GPU box has about that many CPUs per GPU, so a job holding one GPU and a
job holding that many CPUs hold the same share of a typical box. A job asking for no CPU counts as one
CPU (it still takes a job slot).

Usage decays exponentially: a GPU-second used `age` seconds ago counts 2^(-age / half_life). Over an
interval [start, end] at weight w, seen at `now`, that is the integral
    w * half_life / ln 2 * (2^(-(now - end) / half_life) - 2^(-(now - start) / half_life)),
so a user's usage is one accumulator (value, as of when) per user: decayed forward to `now` by
multiplying, and each finished job added once (coordinator/store/usage.py keeps them in the database).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CPUS_PER_GPU = 8.0
NS = 1_000_000_000


def weight(gpu_count: int, cpu: float) -> float:
    """What one second of a job costs, in GPU-seconds."""
    if gpu_count > 0:
        return float(gpu_count)
    return max(cpu, 1.0) / CPUS_PER_GPU


def decay_factor(seconds: float, half_life_s: float) -> float:
    return float(2.0 ** (-max(seconds, 0.0) / half_life_s))


def interval_usage(w: float, start_ns: int, end_ns: int, now_ns: int, half_life_s: float) -> float:
    """Decayed usage at `now` of a job of weight `w` that ran from start to end (end <= now)."""
    if end_ns <= start_ns:
        return 0.0
    tau = half_life_s / math.log(2)
    recent = decay_factor((now_ns - end_ns) / NS, half_life_s)
    old = decay_factor((now_ns - start_ns) / NS, half_life_s)
    return w * tau * (recent - old)


@dataclass
class Accumulator:
    """A user's decayed usage of finished jobs, as of `as_of_ns`."""

    value: float = 0.0
    as_of_ns: int = 0

    def at(self, now_ns: int, half_life_s: float) -> float:
        return self.value * decay_factor((now_ns - self.as_of_ns) / NS, half_life_s)

    def add(self, amount_at_now: float, now_ns: int, half_life_s: float) -> None:
        self.value = self.at(now_ns, half_life_s) + amount_at_now
        self.as_of_ns = now_ns
