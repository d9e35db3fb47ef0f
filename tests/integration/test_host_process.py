"""The host runtime's job process (agent/runtimes/host.py, HostProcess): started by Popen, its pipes read
with add_reader, its exit seen through a pidfd. Real processes, as the agent's user and (as root) as the
job user: a job printing faster than its output is taken blocks in its write and loses nothing; wait()
gives the exit code once the main process ends, even while a detached process holds its pipes; a stop
ends a job that ignores SIGTERM."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import cast

import psutil
import pytest

from dstack.agent import jobuser
from dstack.agent.runtimes.base import RuntimeJob
from dstack.agent.runtimes.host import OUTPUT_QUEUE, READ_CHUNK, HostProcess, HostRuntime
from dstack.protos.v1 import common_pb2
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

OUT, ERR = int(common_pb2.LOG_STREAM_STDOUT), int(common_pb2.LOG_STREAM_STDERR)


def job_users() -> list[str]:
    users = ["agent"]
    if os.geteuid() == 0 and shutil.which("setpriv"):
        try:
            jobuser.resolve(jobuser.DEFAULT, "host")
            users.append("job-user")
        except jobuser.JobUserError:
            pass
    return users


@pytest.fixture(params=job_users())
def runtime(request: pytest.FixtureRequest) -> Iterator[tuple[HostRuntime, Path]]:
    root = Path(tempfile.mkdtemp(prefix="dstack-proc-test-"))  # in /tmp: the job user can pass through
    root.chmod(0o711)
    user = jobuser.resolve(jobuser.DEFAULT, "host") if request.param != "agent" else None
    # No cgroups: what escapes the job's session is not killed with it (the detached-process case).
    rt = HostRuntime(5.0, str(root), cgroups=False, job_user=user)
    try:
        yield rt, root
    finally:
        asyncio.run(rt.close())
        shutil.rmtree(root, ignore_errors=True)


async def start(rt: HostRuntime, root: Path, name: str, script: str) -> HostProcess:
    workdir = root / name
    prep = await rt.preparation(name, workdir, 0, 0.0)

    def code_trip() -> None:
        workdir.mkdir()
        if prep is not None:
            prep()

    await asyncio.to_thread(code_trip)
    proc = await rt.start(
        RuntimeJob(job_id=name, workdir=workdir, working_dir=".", commands=[script], env={"PATH": "/usr/bin:/bin"})
    )
    assert isinstance(proc, HostProcess)
    return proc


def blocked_in_write(pid: int) -> bool:
    """Whether any process of the job's tree sleeps in a write to a full pipe."""
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return False
    for p in procs:
        try:
            if "pipe_write" in Path(f"/proc/{p.pid}/wchan").read_text():
                return True
        except OSError:
            continue
    return False


def test_a_job_printing_faster_than_its_output_is_taken_blocks_and_loses_nothing(
    runtime: tuple[HostRuntime, Path],
) -> None:
    rt, root = runtime
    size = 20_000_000  # far more than the chunks read ahead (OUTPUT_QUEUE x READ_CHUNK) and the pipe hold
    assert size > 2 * OUTPUT_QUEUE * READ_CHUNK

    async def main() -> None:
        proc = await start(rt, root, "flood", f"head -c {size} /dev/zero; echo done >&2")
        chunks = proc.output()
        first = await anext(chunks)
        # The consumer takes nothing more (the runner waits for the outbox's room): the agent stops reading,
        # so the job blocks in its write instead of the agent's memory taking its output.
        await asyncio.to_thread(wait_for, lambda: blocked_in_write(proc.pid), timeout=60, what="a blocked write")
        assert proc.returncode is None
        got = {OUT: len(first[1]) if first[0] == OUT else 0, ERR: 0}
        err = first[1] if first[0] == ERR else b""
        async for kind, chunk in chunks:
            got[kind] += len(chunk)
            if kind == ERR:
                err += chunk
        assert await proc.wait() == 0
        await proc.cleanup()
        assert got[OUT] == size and err == b"done\n"

    asyncio.run(main())


def test_wait_gives_the_exit_code_while_a_detached_process_still_holds_the_pipes(
    runtime: tuple[HostRuntime, Path],
) -> None:
    rt, root = runtime

    async def main() -> None:
        # The main process exits only once the escapee has its own session (field 6 of its stat): before
        # that, wait()'s kill of the job's process group would still reach it.
        script = (
            "setsid sleep 600 & pid=$!;"
            ' while [ "$(cut -d" " -f6 /proc/$pid/stat)" != "$pid" ]; do sleep 0.01; done; echo $pid; exit 3'
        )
        proc = await start(rt, root, "detached", script)
        lines: list[bytes] = []

        async def read() -> None:
            async for _kind, chunk in proc.output():
                lines.append(chunk)

        reader = asyncio.create_task(read())
        assert await asyncio.wait_for(proc.wait(), 60) == 3
        await asyncio.to_thread(wait_for, lambda: bool(lines), timeout=60, what="the escapee's pid")
        escapee = int(b"".join(lines).split()[0])
        try:
            assert not reader.done()  # the pipes are still held: wait() did not wait for them
            assert psutil.pid_exists(escapee)
        finally:
            os.kill(escapee, signal.SIGKILL)
        await asyncio.wait_for(reader, 60)  # and the output ends once the last holder is gone
        await proc.cleanup()

    asyncio.run(main())


def test_a_stop_ends_a_job_that_ignores_sigterm_and_its_unread_output_leaves_no_pipe_open(
    runtime: tuple[HostRuntime, Path],
) -> None:
    rt, root = runtime

    async def main() -> None:
        fds_before = len(os.listdir("/proc/self/fd"))
        proc = await start(rt, root, "stubborn", "trap '' TERM; echo up; while :; do sleep 0.05; done")
        chunks = cast("AsyncGenerator[tuple[int, bytes], None]", proc.output())  # HostProcess's is one
        assert await anext(chunks) == (OUT, b"up\n")  # its trap is set
        proc.grace_s = 0.2
        await proc.stop(abort=False)  # SIGTERM ignored: SIGKILL after the grace period
        assert await asyncio.wait_for(proc.wait(), 60) == -signal.SIGKILL
        await proc.cleanup()  # its output was not read to its end: the pipes are closed here
        await chunks.aclose()
        assert len(os.listdir("/proc/self/fd")) == fds_before

    asyncio.run(main())
