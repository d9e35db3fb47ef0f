"""The agent's cgroupfs work per host job, alone: the five opens a job's pooled pids group costs the agent
(agent/runtimes/cgroups.py), against the host's real cgroupfs, without the job's processes around them.

Usage: python -m bench.cgroup_ops [--jobs 2000] [--rounds 5] [--depth 1 4]   (root, a writable cgroup v1 pids
hierarchy or a delegated v2 one)

Per job, as the agent does them for a job in a pooled group: the pool's emptiness check (cgroup.procs read),
the job's process moved in (cgroup.procs write), the close's cgroup.procs and pids.events reads, and
give_back's pids.current read. The moved process (a `sleep` of this bench) is moved back out to its own
group after each join, by path, which costs the same on every tree. DEPTH is how many folders the agent's own
group sits below the hierarchy's root: 1 here in a container, 4 under systemd
(system.slice/dstack-agent.service/agent, then the agent's dstack-<hash>): each open by path walks them
all. Prints this process's CPU per job (time.process_time), medians over rounds.

Run it from each tree for an A/B, alternated: `PYTHONPATH=TREE python -m bench.cgroup_ops` (a tree before
JobCgroup.join moves the process with jobuser.join_cgroups).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from dstack.agent import jobuser
from dstack.agent.runtimes.cgroups import CgroupLayout, JobCgroup, _own_groups

NEST = "dstack-bench-cgroup-ops"


def own_group_file(depth: int) -> Path:
    """A /proc/self/cgroup stand-in that puts the agent DEPTH-1 folders below this process's own groups."""
    nest = "/".join([NEST, *[f"n{i}" for i in range(depth - 2)]]) if depth > 1 else ""  # depth-1 folders
    lines = [
        f"{i}:{ctrl}:{(group.rstrip('/') + '/' + nest) if nest else group}"
        for i, (ctrl, group) in enumerate(_own_groups().items())
    ]
    f = Path(tempfile.mkstemp(prefix="dstack-bench-cgroup-")[1])
    f.write_text("\n".join(lines) + "\n")
    return f


def joiner(cg: JobCgroup) -> Callable[[int], None]:
    join: Callable[[int], None] | None = getattr(cg, "join", None)
    if join is not None:
        return join
    return lambda pid: jobuser.join_cgroups(cg.joined, pid)  # type: ignore[attr-defined]  # a tree before join


def one_round(layout: CgroupLayout, depth: int, jobs: int, pid: int) -> float:
    own_procs = layout.dirs["pids"].parents[depth - 1] / "cgroup.procs"  # the helper's own group
    cg = layout.job("bench", 0, 0.0, 64)
    cg.create()
    cg.clean = True  # as a clean job's close leaves it
    assert layout.give_back(cg)
    cpu0 = time.process_time()
    for i in range(jobs):
        cg = layout.job(f"bench{i}", 0, 0.0, 64)  # the pool's emptiness check: cgroup.procs read
        assert cg.created and not cg.create()  # the pooled group, as it is: no file touched
        joiner(cg)(pid)  # the job's process moved in
        own_procs.write_text(str(pid))  # out again (the same on every tree)
        cg.close_at_once()  # cgroup.procs and pids.events reads
        cg.clean = True
        assert layout.give_back(cg)  # pids.current read
    return (time.process_time() - cpu0) / jobs * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--depth", type=int, nargs="+", default=[1, 4])
    args = p.parse_args()
    helper = subprocess.Popen(["sleep", "3600"])
    home = tempfile.mkdtemp(prefix="dstack-bench-cgroup-home-")
    try:
        for depth in args.depth:
            proc_cgroup = own_group_file(depth)
            layout = CgroupLayout.discover(home, proc_cgroup=str(proc_cgroup))
            if "pids" not in layout.dirs:
                raise SystemExit("no writable pids controller here (root, cgroup v1 pids or delegated v2)")
            try:
                ms = [one_round(layout, depth, args.jobs, helper.pid) for _ in range(args.rounds)]
            finally:
                layout.remove()
                proc_cgroup.unlink()
                for d in set(layout.dirs.values()):  # the nest made for this depth, in each hierarchy
                    for up in list(d.parents)[: depth - 1]:
                        with contextlib.suppress(OSError):
                            up.rmdir()
            load = os.getloadavg()[0]
            print(
                f"depth {depth}: agent CPU {statistics.median(ms) * 1e3:.1f} us/job (median of {args.rounds};"
                f" min {min(ms) * 1e3:.1f}), load {load:.1f}"
            )
    finally:
        helper.kill()
        helper.wait()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
