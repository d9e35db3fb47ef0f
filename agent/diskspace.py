"""The agent's work folder filling up: how much space it keeps free, when it counts as full, and which
failures a full disk caused rather than the job.

- `--min-free-disk` (`MinFree`): a size (`2GiB`), a share of the disk (`5%`), or `0` (never full by
  the floor; a write that meets ENOSPC still counts). Default: 1 GiB or 5% of the disk, the smaller,
  so a small disk (a test's tmpfs, a laptop) is not full from the start.
- `DiskWatch` measures the free space of the agent's work folders (the job folders and the code
  cache; the least free of them when they are on different disks). Below the floor the agent is
  *disk full*: its inventory says so (`Inventory.disk_full`), the coordinator places nothing new on it
  (draining) until a later look finds the space back, and a job assigned meanwhile ends at once.
- `caused_by_full_disk`: whether an error that stopped a job's preparation (code download or unpack,
  input artifacts, its environment) was the disk refusing a write (ENOSPC, EDQUOT): such a job ends
  with TERMINATION_REASON_DISK_FULL, which the coordinator requeues on another agent (within a bound),
  instead of failing it as the user's fault.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from dstack.agent.envcache import parse_size
from dstack.storage.errors import DISK_FULL_ERRNOS

MIB = 1 << 20
GIB = 1 << 30
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
# How the C library says ENOSPC and EDQUOT, as a failed command's output (pip, tar, a runtime) shows it.
_MESSAGES = ("No space left on device", "Disk quota exceeded")


@dataclass(frozen=True)
class MinFree:
    """The free space the agent keeps in its work folder: `size` bytes and/or `fraction` of the disk
    (the smaller of the two when both are given); neither: no floor."""

    size: int | None = None
    fraction: float | None = None

    def floor(self, total: int) -> int:
        given = [v for v in (self.size, None if self.fraction is None else int(total * self.fraction)) if v is not None]
        return min(given) if given else 0

    def __str__(self) -> str:
        parts = [f"{self.size / GIB:g} GiB" for _ in [0] if self.size is not None] + [
            f"{self.fraction * 100:g}%" for _ in [0] if self.fraction is not None
        ]
        return " or ".join(parts) + (", the smaller" if len(parts) == 2 else "") if parts else "0"


DEFAULT_MIN_FREE = MinFree(size=GIB, fraction=0.05)


def parse_min_free(text: str) -> MinFree:
    """`5%`, `2GiB`, `500MB`, `0` (no floor) -> MinFree; ValueError with what to give otherwise."""
    m = _PERCENT.match(text)
    if m is not None:
        pct = float(m.group(1))
        if not 0 <= pct < 100:
            raise ValueError(f"not a share of the disk: {text!r} (expected e.g. 5%)")
        return MinFree(fraction=pct / 100) if pct else MinFree()
    size = parse_size(text.strip())
    return MinFree(size=size) if size else MinFree()


@dataclass(frozen=True)
class DiskState:
    path: str  # the work folder with the least free space
    free: int
    total: int
    floor: int  # what the agent keeps free there
    full: bool

    def describe(self, agent: str) -> str:
        """The reason a job's attempt ends with, and what `dstack agents` users read."""
        return f"agent disk full on {agent}: {self.free // MIB} MiB free in {self.path}"


NOT_MEASURED = DiskState(path="", free=0, total=0, floor=0, full=False)


class DiskWatch:
    """The free space of the agent's work folders against its floor. `measure` is blocking (statvfs):
    call it in a worker thread; `state` is the last measure, free to read on the event loop."""

    def __init__(self, paths: list[Path], min_free: MinFree = DEFAULT_MIN_FREE) -> None:
        self.paths = paths
        self.min_free = min_free
        self.state = NOT_MEASURED

    def measure(self) -> DiskState:
        least: DiskState | None = None
        for path in self.paths:
            try:
                st = os.statvfs(path)
            except FileNotFoundError:
                continue  # not made yet (a job user's root before the first start): nothing is written there
            free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
            if least is None or free < least.free:
                floor = self.min_free.floor(total)
                least = DiskState(str(path), free, total, floor, free < floor)
        self.state = least or NOT_MEASURED
        return self.state


def caused_by_full_disk(e: BaseException) -> bool:
    """Whether `e`, or an error it was raised from, is the disk refusing a write (ENOSPC, EDQUOT), as an
    OSError or as a failed command's words (`No space left on device` in pip's or tar's output)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in DISK_FULL_ERRNOS:
            return True
        if any(m in str(cur) for m in _MESSAGES):
            return True
        cur = cur.__cause__ or cur.__context__
    return False
