"""The host runtime's own cost per job, in process (no coordinator, no gRPC): JOBS jobs of `true`, 16 at
once, through agent/runtimes/host.py as the runner drives it (the runtime's preparation on the code trip,
start, output, wait, cleanup), per variant, rounds alternated; medians.

Usage: python -m bench.host_path [--jobs 300] [--rounds 3] [VARIANT ...]

Variants: plain (no cgroup, the agent's user), pids (a pids-limited cgroup per job, the default: reused from
the agent's pool), user (as the job user: setpriv and the environment pipe; root only), user+pids (root's
default). Prints the agent process's CPU per job (user+system of this process: its threads, not its
children) and the children's (setpriv, bash: they exit before the next figure is taken), and jobs/s. The
baseline is `plain` in the same run: what the job user and the pids cgroup add on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from dstack.agent import jobuser
from dstack.agent.main import _use_pidfd_child_watcher
from dstack.agent.runtimes.base import RuntimeJob
from dstack.agent.runtimes.host import HostRuntime

VARIANTS = ("plain", "pids", "user", "user+pids")


async def one_job(rt: HostRuntime, root: Path, i: int) -> None:
    workdir = root / f"j{i}"
    job_id = f"job{i}"
    prep = await rt.preparation(job_id, workdir, 0, 0.0)

    def code_trip() -> None:  # the runner's: the code unpacked (here an empty folder), then the runtime's work
        workdir.mkdir()
        if prep is not None:
            prep()

    await asyncio.to_thread(code_trip)
    proc = await rt.start(
        RuntimeJob(job_id=job_id, workdir=workdir, working_dir=".", commands=["true"], env={"PATH": "/usr/bin:/bin"})
    )

    async def drain() -> None:
        async for _ in proc.output():
            pass

    pump = asyncio.create_task(drain())
    code = await proc.wait()
    await pump
    await proc.cleanup()
    rt.forget(job_id)
    if code != 0:
        raise RuntimeError(f"job {i} exited with {code}")


def spawner_cpu(rt: HostRuntime) -> float:
    """The job user's spawner's CPU seconds with the jobs it reaped (agent/spawner.py: as root, the jobs are
    its children, not this process's); 0 without one."""
    spawner = getattr(rt, "_spawner", None)
    if spawner is None or spawner.proc is None:
        return 0.0
    t = psutil.Process(spawner.proc.pid).cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


def make_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="dstack-host-path-"))
    root.chmod(0o711)  # the job user passes through to its folder
    return root


async def variant(name: str, jobs: int) -> tuple[float, float, float]:
    root = make_root()  # before the clock starts: a blocking call is no matter here
    user = jobuser.resolve(jobuser.DEFAULT, "host") if "user" in name else None
    pids = "pids" in name
    rt = HostRuntime(10.0, str(root), cgroups=pids, job_user=user, pids_limit=4096 if pids else 0)
    at_once = asyncio.Semaphore(16)

    async def limited(i: int) -> None:
        async with at_once:
            await one_job(rt, root, i)

    try:
        await limited(-1)  # the cgroup layout is found once, before the clock starts
        s0, t0, w0 = spawner_cpu(rt), os.times(), time.monotonic()
        await asyncio.gather(*(limited(i) for i in range(jobs)))
        s1, t1, wall = spawner_cpu(rt), os.times(), time.monotonic() - w0
    finally:
        await rt.close()
        shutil.rmtree(root, ignore_errors=True)
    own = (t1.user - t0.user + t1.system - t0.system) / jobs * 1e3
    children = (t1.children_user - t0.children_user + t1.children_system - t0.children_system + s1 - s0) / jobs * 1e3
    return own, children, jobs / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("variants", nargs="*", metavar="VARIANT", help=f"of {', '.join(VARIANTS)} (default: all)")
    a = p.parse_args()
    if unknown := [v for v in a.variants if v not in VARIANTS]:
        p.error(f"unknown variant(s) {', '.join(unknown)}: expected {', '.join(VARIANTS)}")
    _use_pidfd_child_watcher()  # as the agent does: no thread per job process
    names = a.variants or [v for v in VARIANTS if "user" not in v or os.geteuid() == 0]
    results: dict[str, list[tuple[float, float, float]]] = {v: [] for v in names}
    for r in range(a.rounds):
        for v in names if r % 2 == 0 else names[::-1]:
            res = asyncio.run(variant(v, a.jobs))
            results[v].append(res)
            print(
                f"round {r} {v}: agent {res[0]:.2f} ms CPU/job, children {res[1]:.2f} ms, {res[2]:.0f} jobs/s"
                f" (load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    print("\n| variant | agent CPU ms/job | children CPU ms/job | jobs/s |\n|---|---|---|---|")
    for v, xs in results.items():
        med = [statistics.median(x[i] for x in xs) for i in range(3)]
        print(f"| {v} | {med[0]:.2f} | {med[1]:.2f} | {med[2]:.0f} |")


if __name__ == "__main__":
    main()
