"""The job user's spawner (agent/spawner.py): a root agent's host jobs started by one process that is the
job user already, instead of a setpriv per job. Real processes, root and the job user: a job gets exactly
what setpriv gave it (ids, groups, capabilities, no_new_privs, its own session, its cgroup before any of
its code); a job can reach nothing of the spawner's; a job that kills or stops it makes the agent start
another, and the next job still runs as the job user, never as root."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from dstack.agent import spawner as spawner_module
from dstack.agent.runtimes.host import LOST_STATUS, HostProcess, HostRuntime, SpawnedShell
from dstack.agent.spawner import Spawner
from tests.hostjobs import JOB_USER, host_runtime, job_users, start_host_job

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(JOB_USER not in job_users(), reason="needs root, setpriv and the job user"),
]

# What a job says of itself: its credentials, capability sets, session and cgroups, and its open fds.
SELF = (
    "grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status;"
    ' echo "sid=$(($(cut -d" " -f6 /proc/self/stat) == $$))";'
    " sed -n 's/^[0-9]*:\\(pids\\|memory\\):/\\1 /p' /proc/self/cgroup | sed 's/[0-9a-f]\\{12\\}$/X/';"
    " ls /proc/self/fd | sort -n | tr '\\n' ' '"
)


@pytest.fixture
def runtime() -> Iterator[tuple[HostRuntime, Path]]:
    with host_runtime(JOB_USER, "dstack-spawner-test-") as made:
        yield made


async def run(rt: HostRuntime, root: Path, name: str, script: str) -> tuple[int, str, HostProcess]:
    proc = await start_host_job(rt, root, name, script)
    out = b"".join([chunk async for _, chunk in proc.output()])
    code = await proc.wait()
    await proc.cleanup()
    return code, out.decode(), proc


def spawner_of(rt: HostRuntime) -> Spawner:
    assert rt._spawner is not None and rt._spawner.proc is not None
    return rt._spawner


def test_a_job_from_the_spawner_is_what_setpriv_made_it(runtime: tuple[HostRuntime, Path]) -> None:
    rt, root = runtime

    async def main() -> None:
        code, spawned, proc = await run(rt, root, "spawned", SELF)
        assert code == 0 and isinstance(proc.popen, SpawnedShell)
        rt._spawner_for(rt.job_user, {}).unavailable = True  # type: ignore[arg-type] # the setpriv path
        code, by_setpriv, proc = await run(rt, root, "setpriv", SELF)
        assert code == 0 and not isinstance(proc.popen, SpawnedShell)
        assert spawned == by_setpriv, (spawned, by_setpriv)
        job_user = rt.job_user
        assert job_user is not None
        ids = f"\t{job_user.uid}\t{job_user.uid}\t{job_user.uid}\t{job_user.uid}\n"
        assert f"Uid:{ids}" in spawned and re.search(r"Groups:\s*\n", spawned)
        assert "CapEff:\t0000000000000000" in spawned and "CapPrm:\t0000000000000000" in spawned
        assert "sid=1" in spawned  # its own session
        assert "pids /dstack-" in spawned  # in its job's group when its first command ran
        assert spawned.rstrip().endswith("0 1 2 3")  # stdin, stdout, stderr and ls's own: nothing else

    asyncio.run(main())


def test_a_job_reaches_nothing_of_the_spawner(runtime: tuple[HostRuntime, Path]) -> None:
    """Attack: the job is the spawner's child and the same user; its fds, /proc files, memory and any
    socket address stay out of reach, and the spawner holds no capability a job lacks."""
    rt, root = runtime
    probe = (
        'ls /proc/$PPID/fd /proc/$PPID/fdinfo /proc/$PPID/map_files >/dev/null 2>&1 && echo "open fd";'
        ' for what in environ maps stack; do head -c1 /proc/$PPID/$what >/dev/null 2>&1 && echo "read $what"; done;'
        " ls -l /proc/self/fd /proc/$$/fd | grep -c socket || true;"
        " echo ppid=$PPID"
    )

    async def main() -> tuple[str, int]:
        code, out, _ = await run(rt, root, "probe", probe)
        assert code == 0, out
        spawner = spawner_of(rt)
        assert spawner.proc is not None
        return out, spawner.proc.pid

    out, pid = asyncio.run(main())
    assert f"ppid={pid}" in out  # it did probe the spawner
    assert "open " not in out and "read " not in out, out
    assert out.splitlines()[0] == "0", out  # no socket among the job's fds
    status = Path(f"/proc/{pid}/status").read_text()
    assert rt.job_user is not None and re.search(rf"Uid:\t{rt.job_user.uid}\t", status)
    assert "CapEff:\t0000000000000000" in status and "CapPrm:\t0000000000000000" in status
    # Its end of the socketpair has no name a job could connect to (no path, no abstract address).
    links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    sockets = [link[len("socket:[") : -1] for link in links if link.startswith("socket:")]
    assert len(sockets) == 1
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[6] == sockets[0]:
            assert len(fields) == 7, line  # no path or @name column


def test_a_job_that_kills_the_spawner_fails_alone_and_the_next_runs_as_the_job_user(
    runtime: tuple[HostRuntime, Path],
) -> None:
    """Attack: a job kills its spawner (it may: the same user). Its own exit status is lost, so it fails
    as lost; the agent starts another spawner, as the job user, for the next job: never root."""
    rt, root = runtime

    async def main() -> None:
        code, _, _ = await run(rt, root, "first", "true")
        first = spawner_of(rt).proc
        assert first is not None and code == 0
        code, _, proc = await run(rt, root, "killer", "kill -9 $PPID; sleep 0.2; exit 3")
        assert proc.lost == LOST_STATUS and code != 3
        code, out, proc = await run(rt, root, "next", "id -u; id -G; echo $PPID")
        assert code == 0, out
        again = spawner_of(rt).proc
        assert again is not None and again.pid != first.pid and first.poll() is not None
        uid, groups, ppid = out.split()
        assert rt.job_user is not None
        assert (int(uid), int(groups), int(ppid)) == (rt.job_user.uid, rt.job_user.gid, again.pid)
        assert proc.lost == ""

    asyncio.run(main())


def test_a_job_that_stops_the_spawner_makes_the_agent_replace_it(
    runtime: tuple[HostRuntime, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: a job stops its spawner (SIGSTOP). The agent does not wait for it forever: past the timeout
    the stopped one is killed and the next job runs from a new one."""
    monkeypatch.setattr(spawner_module, "SPAWN_TIMEOUT_S", 1.0)
    rt, root = runtime

    async def main() -> None:
        code, _, proc = await run(rt, root, "stopper", "kill -STOP $PPID")
        stopped = proc.popen
        assert proc.lost == LOST_STATUS  # its status was behind the stopped spawner
        code, out, proc = await run(rt, root, "next", "id -u")
        assert code == 0 and int(out) == rt.job_user.uid  # type: ignore[union-attr]
        assert isinstance(stopped, SpawnedShell) and isinstance(proc.popen, SpawnedShell)

    asyncio.run(main())


def test_an_answer_naming_a_process_not_the_job_users_is_refused(runtime: tuple[HostRuntime, Path]) -> None:
    """Attack on the agent's trust: a pid is taken only with a pidfd of that very pid, of the job user's
    process; a spawner naming root's process 1, or a pid its pidfd does not name, is refused."""
    rt, root = runtime

    async def main() -> None:
        proc = await start_host_job(rt, root, "held", "sleep 30")
        spawner = spawner_of(rt)
        try:
            init_fd, job_fd = os.pidfd_open(1), os.pidfd_open(proc.pid)
            try:
                assert spawner._is_job_users(proc.pid, job_fd)
                assert not spawner._is_job_users(1, init_fd)  # root's
                assert not spawner._is_job_users(proc.pid, init_fd)  # the pidfd names another
                assert not spawner._is_job_users(1, job_fd)
            finally:
                os.close(init_fd)
                os.close(job_fd)
        finally:
            await proc.stop(abort=True)
            await proc.wait()
            await proc.cleanup()

    asyncio.run(main())


def test_with_no_python_the_job_user_can_run_jobs_go_through_setpriv(
    runtime: tuple[HostRuntime, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Fail closed: an interpreter that cannot start as the job user (as the agent's own Python under a
    root-only home cannot read its library) is not used, nor is anything run as root in its place: jobs
    go through setpriv as before."""
    python = tmp_path / "python3"
    python.write_text("#!/bin/sh\necho 'cannot read its library' >&2; exit 1\n")
    python.chmod(0o755)
    monkeypatch.setattr(spawner_module, "_candidates", lambda: [str(python)])
    rt, root = runtime

    async def main() -> None:
        code, out, proc = await run(rt, root, "fallback", "id -u")
        assert code == 0 and int(out) == rt.job_user.uid  # type: ignore[union-attr]
        assert not isinstance(proc.popen, SpawnedShell)
        assert rt._spawner is not None and rt._spawner.unavailable

    asyncio.run(main())


def test_a_start_given_up_while_the_spawner_answers_runs_nothing_and_leaks_nothing(
    runtime: tuple[HostRuntime, Path],
) -> None:
    """A job's start cancelled (the job stopped) after its request went to the spawner: the shell started
    anyway gets no environment, so it runs nothing of the job's; the late answer's pidfd is closed and
    the shell reaped; the agent keeps no pipe of it."""
    rt, root = runtime
    marker = root / "ran"

    def fds() -> list[str]:
        links = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
        # Pipes and pidfds: the job's (a cgroup folder's fd comes and goes with the group pool).
        return sorted(link for link in links if link.startswith(("pipe:", "anon_inode:[pidfd]")))

    async def main() -> None:
        await run(rt, root, "warm", "true")  # the spawner is up
        spawner = spawner_of(rt)
        assert spawner.proc is not None
        spawner_pid, before = spawner.proc.pid, fds()
        os.kill(spawner_pid, signal.SIGSTOP)
        try:
            start = asyncio.create_task(start_host_job(rt, root, "given-up", f"touch {marker}"))
            await wait_for_async(lambda: bool(spawner._pending))  # the request is in the spawner's socket
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await start
        finally:
            os.kill(spawner_pid, signal.SIGCONT)
        await wait_for_async(lambda: not spawner._pending and fds() == before)
        await wait_for_async(lambda: not psutil.Process(spawner_pid).children())  # reaped
        assert not marker.exists()
        code, _, _ = await run(rt, root, "after", "id -u")  # the same spawner still serves
        assert code == 0 and spawner_of(rt) is spawner

    asyncio.run(main())


async def wait_for_async(cond: Callable[[], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + 60
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_a_slow_spawner_is_waited_for_not_replaced(
    runtime: tuple[HostRuntime, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a loaded machine the spawner may answer late (seen at load 50-70 past a 10 s timeout, failing
    every job it was starting): a spawner that is not stopped is waited for. Here it is held for 10 waits'
    length while it does not look stopped; the job then starts, from the same spawner."""
    monkeypatch.setattr(spawner_module, "SPAWN_TIMEOUT_S", 0.1)
    monkeypatch.setattr(spawner_module, "_stopped", lambda _pid: False, raising=False)  # busy, as far as the agent sees
    rt, root = runtime

    async def main() -> None:
        await run(rt, root, "warm", "true")
        spawner = spawner_of(rt)
        assert spawner.proc is not None
        os.kill(spawner.proc.pid, signal.SIGSTOP)
        try:
            start = asyncio.create_task(run(rt, root, "late", "id -u"))
            await asyncio.sleep(1.0)  # ten timeouts' length: a wait with a deadline would have given up
            assert not start.done()
        finally:
            os.kill(spawner.proc.pid, signal.SIGCONT)
        code, out, _ = await start
        assert code == 0 and int(out) == rt.job_user.uid  # type: ignore[union-attr]
        assert spawner_of(rt) is spawner

    asyncio.run(main())


def test_jobs_starting_at_once_share_one_spawner(runtime: tuple[HostRuntime, Path]) -> None:
    """The first jobs of an agent start together (bench.e2e: 16 at once): one spawner is started for all
    of them, none is replaced under another's start, and every job runs."""
    rt, root = runtime

    async def main() -> None:
        results = await asyncio.gather(*(run(rt, root, f"at-once-{i}", "id -u") for i in range(16)))
        assert rt.job_user is not None
        assert [(code, int(out)) for code, out, _ in results] == [(0, rt.job_user.uid)] * 16
        owners = {p.popen.spawned.spawner_pid for _, _, p in results if isinstance(p.popen, SpawnedShell)}
        assert owners == {spawner_of(rt).proc.pid}  # type: ignore[union-attr]

    asyncio.run(main())
