"""The pool of reused job cgroups (agent/runtimes/cgroups.py: CgroupLayout.job, give_back) against real
processes and the host's real cgroupfs, through the host runtime as the runner drives it (no coordinator:
seconds per test). A group is reused only when its job ended clean; each attack here tries to leave
something in a group for the next job, or to make the next job inherit a sealed group or a counter.

Run as root, each case runs twice: as the agent's own user, and as the job user (root's default).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from dstack.agent.runtimes.cgroups import POOL_PREFIX, CgroupLayout
from dstack.agent.runtimes.host import HostProcess, HostRuntime
from tests.conftest import wait_for
from tests.hostjobs import host_runtime, job_users, start_host_job

PIDS_LIMIT = 24
# The job's own pids group, from inside it: v1's pids line, else the unified one.
WHERE = r"""
g=$(grep -E '^[0-9]+:pids:' /proc/self/cgroup | cut -d: -f3)
[ -n "$g" ] || g=$(grep -E '^0::' /proc/self/cgroup | cut -d: -f3)
echo "group $g"
"""


def pids_group_possible() -> bool:
    root = Path(tempfile.mkdtemp(prefix="dstack-pool-probe-"))
    try:
        layout = CgroupLayout.discover(str(root))
        ok = "pids" in layout.dirs
        layout.remove()
        return ok
    finally:
        shutil.rmtree(root, ignore_errors=True)


pytestmark = pytest.mark.skipif(not pids_group_possible(), reason="no writable cgroup pids controller here")


@pytest.fixture(params=job_users())
def runtime(request: pytest.FixtureRequest) -> Iterator[tuple[HostRuntime, Path]]:
    with host_runtime(request.param, "dstack-pool-test-", cgroups=True, pids_limit=PIDS_LIMIT) as made:
        yield made


class Ran:
    def __init__(self, code: int, out: str, proc: HostProcess, lines: list[str]) -> None:
        self.code, self.out, self.proc, self.lines = code, out, proc, lines

    @property
    def group(self) -> str:
        m = re.search(r"group (\S+)", self.out)
        assert m, self.out
        return m.group(1)


async def run_job(rt: HostRuntime, root: Path, name: str, script: str, stop_after: str | None = None) -> Ran:
    """One job as the runner runs it: preparation on the code trip, start, output, wait, cleanup. With
    stop_after, `dstack stop` comes once that text is printed."""
    lines: list[str] = []
    proc = await start_host_job(rt, root, name, script, lines.append)
    out: list[bytes] = []

    async def drain() -> None:
        async for _, chunk in proc.output():
            out.append(chunk)
            if stop_after is not None and stop_after.encode() in b"".join(out):
                await proc.stop(abort=False)

    pump = asyncio.create_task(drain())
    code = await proc.wait()
    await pump
    await proc.cleanup()
    rt.forget(name)
    return Ran(code, b"".join(out).decode(errors="replace"), proc, lines)


def pids_max(rt: HostRuntime, group: str) -> str:
    assert rt._layout is not None
    return (rt._layout.dirs["pids"] / Path(group).name / "pids.max").read_text().strip()


def test_a_clean_jobs_group_is_reused_and_a_process_planted_in_it_never_reaches_a_job(
    runtime: tuple[HostRuntime, Path],
) -> None:
    rt, root = runtime
    planted = subprocess.Popen(["sleep", "300"])  # the process the attack puts into an idle pooled group

    async def scenario() -> None:
        first = await run_job(rt, root, "j1", WHERE)
        assert first.code == 0 and Path(first.group).name.startswith(POOL_PREFIX), first.out
        second = await run_job(rt, root, "j2", WHERE)
        assert second.code == 0 and second.group == first.group, (first.out, second.out)
        assert pids_max(rt, second.group) == str(PIDS_LIMIT)
        # The attack: a process put into the idle pooled group (only the agent, or a job running as the
        # agent's own user, can write there) must not run on in the next job's group.
        assert rt._layout is not None
        group_dir = rt._layout.dirs["pids"] / Path(second.group).name
        (group_dir / "cgroup.procs").write_text(str(planted.pid))
        third = await run_job(rt, root, "j3", WHERE)
        assert third.code == 0 and third.group != second.group, third.out
        assert await asyncio.to_thread(planted.wait, 30) == -9  # killed with the group it was in
        await asyncio.to_thread(
            wait_for, lambda: not group_dir.exists(), timeout=30, what="the tainted group to be removed"
        )

    try:
        asyncio.run(scenario())
    finally:
        planted.kill()
        planted.wait()


def test_a_job_that_leaves_a_process_behind_gets_its_group_removed_not_reused(
    runtime: tuple[HostRuntime, Path],
) -> None:
    rt, root = runtime

    async def scenario() -> None:
        first = await run_job(rt, root, "j1", WHERE + 'setsid sleep 300 >/dev/null 2>&1 < /dev/null &\necho "left $!"')
        assert first.code == 0, first.out
        left = int(re.search(r"left (\d+)", first.out).group(1))  # type: ignore[union-attr]

        def gone() -> bool:
            try:
                return psutil.Process(left).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        await asyncio.to_thread(wait_for, gone, timeout=30, what="the process the job left to be killed")
        second = await run_job(rt, root, "j2", WHERE)
        assert second.code == 0 and second.group != first.group, (first.out, second.out)
        assert pids_max(rt, second.group) == str(PIDS_LIMIT)  # not the sealed group's 0

    asyncio.run(scenario())


def test_a_job_that_hit_its_pids_limit_or_was_stopped_passes_nothing_on(runtime: tuple[HostRuntime, Path]) -> None:
    # Its pids.events count (or its seal: pids.max 0) would be the next job's: that group is never reused.
    rt, root = runtime

    async def scenario() -> None:
        # The forks run in a subshell, whose status is ignored: bash gives up on a failed fork (exit 126|128
        # = 254) when a child's SIGCHLD cuts its retry sleep short, which load makes likely, and the job's
        # script runs under `set -e`; the job itself still ends clean.
        bomb = WHERE + f"(for i in $(seq {PIDS_LIMIT * 2}); do sleep 1 & done; wait) 2>/dev/null || true\necho done"
        hit = await run_job(rt, root, "j1", bomb)
        assert hit.code == 0 and any("hit its pids limit" in line for line in hit.lines), (hit.out, hit.lines)
        after_hit = await run_job(rt, root, "j2", WHERE)
        assert after_hit.group != hit.group and not after_hit.lines, (after_hit.out, after_hit.lines)
        stopped = await run_job(rt, root, "j3", WHERE + "echo started\nsleep 300", stop_after="started")
        assert stopped.code != 0, stopped.out
        after_stop = await run_job(rt, root, "j4", WHERE + "sleep 0.1 & wait; echo forked")
        assert after_stop.group != stopped.group and "forked" in after_stop.out, after_stop.out
        assert pids_max(rt, after_stop.group) == str(PIDS_LIMIT)

    asyncio.run(scenario())


def test_a_job_that_ends_while_its_stop_is_under_way_passes_on_no_sealed_group(
    runtime: tuple[HostRuntime, Path],
) -> None:
    # As the agent runs them, a stop and the job's wait are separate tasks. A job that exits on SIGTERM at once
    # ends clean: its wait and cleanup gave the group back to the pool while the stop's kill_all, on a worker
    # thread, had yet to seal it (pids.max 0). The next job then got a group it could not fork in (seen in CI:
    # a preempted job's next attempt failed with "bash: fork: Resource temporarily unavailable"), and a stop
    # that came later still would have killed the next job's processes.
    rt, root = runtime

    async def scenario() -> None:
        name = "j1"
        proc = await start_host_job(rt, root, name, WHERE + "echo started\nexec sleep 300")
        out = b""
        async for _, chunk in proc.output():
            out += chunk
            if b"started" in out:
                break
        # The stop's kill_all reaches its worker thread late (a loaded machine): it runs once the cleanup did.
        cgroup = proc.cgroup
        assert cgroup is not None
        kill_all, entered, go_on = cgroup.kill_all, threading.Event(), threading.Event()

        def late_kill_all() -> int:
            entered.set()
            go_on.wait(30)
            return kill_all()

        cgroup.kill_all = late_kill_all  # type: ignore[method-assign]
        stopping = asyncio.create_task(proc.stop(abort=False))
        await proc.wait()
        await asyncio.to_thread(entered.wait, 30)
        await proc.cleanup()  # as the runner does: once the job ended, not once its stop has finished
        rt.forget(name)
        go_on.set()
        await stopping
        after = await run_job(rt, root, "j2", WHERE + "sleep 0.1 & wait; echo forked")
        assert "forked" in after.out, after.out
        assert pids_max(rt, after.group) == str(PIDS_LIMIT)

    asyncio.run(scenario())


def handles_into(folder: Path, pid: int | str = "self") -> list[str]:
    """What the process's fds are, of those that are in the folder or under it."""
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{name}").removesuffix(" (deleted)")  # a removed folder's
            if target == str(folder) or target.startswith(f"{folder}/"):
                out.append(target)
    return out


def test_the_agents_handle_of_a_group_never_reaches_its_job_and_goes_with_the_group(
    runtime: tuple[HostRuntime, Path],
) -> None:
    # The agent opens a job group's files relative to a handle of its folder. The attack: a job looks for
    # that handle among its own fds (it could join or seal its group through it), in a reused group whose
    # handle the agent holds while the job runs; and a removed group's handle must not stay open.
    rt, root = runtime
    fds = WHERE + 'for f in /proc/$$/fd/*; do echo "fd $(readlink "$f")"; done\n'

    async def scenario() -> None:
        first = await run_job(rt, root, "j1", fds)
        second = await run_job(rt, root, "j2", fds)
        assert first.code == 0 and second.code == 0 and second.group == first.group, (first.out, second.out)
        assert rt._layout is not None
        parent = rt._layout.dirs["pids"]
        group = parent / Path(second.group).name
        assert handles_into(group) == [str(group)], "the agent holds the pooled group's folder open"
        assert re.findall(r"^fd (\S+)", second.out, re.M), second.out  # the job did list its fds
        assert [line for line in second.out.splitlines() if "cgroup" in line.removeprefix("fd ")] == [], second.out
        # A stopped job's group is sealed and removed, not pooled: its handle goes with it.
        stopped = await run_job(rt, root, "j3", WHERE + "echo started\nsleep 300", stop_after="started")
        stopped_group = parent / Path(stopped.group).name
        await asyncio.to_thread(
            wait_for, lambda: not stopped_group.exists(), timeout=30, what="the stopped job's group to be removed"
        )
        assert handles_into(stopped_group) == []
        last = await run_job(rt, root, "j4", WHERE)
        assert last.code == 0 and handles_into(parent / Path(last.group).name), last.out
        pooled = list(rt._layout.pool)  # held here: their handles must be closed by the removal itself
        assert pooled
        await rt.close()  # the agent stops: its pool goes, and every handle of a group with it
        assert handles_into(parent) == [] and not any(path.exists() for cg in pooled for path in cg.paths.values())

    asyncio.run(scenario())
