"""The host runtime's job process (agent/runtimes/host.py, HostProcess): started by Popen, its pipes read
with add_reader, its exit seen through a pidfd. Real processes, as the agent's user and (as root) as the
job user: a job printing faster than its output is taken blocks in its write and loses nothing; wait()
gives the exit code once the main process ends, even while a detached process holds its pipes; a stop
ends a job that ignores SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import cast

import psutil
import pytest

from dstack.agent.runtimes.host import OUTPUT_QUEUE, READ_CHUNK, HostRuntime
from dstack.protos.v1 import common_pb2
from tests.conftest import wait_for
from tests.hostjobs import host_runtime, job_users, start_host_job

pytestmark = pytest.mark.integration

OUT, ERR = int(common_pb2.LOG_STREAM_STDOUT), int(common_pb2.LOG_STREAM_STDERR)


@pytest.fixture(params=job_users())
def runtime(request: pytest.FixtureRequest) -> Iterator[tuple[HostRuntime, Path]]:
    # No cgroups: what escapes the job's session is not killed with it (the detached-process case).
    with host_runtime(request.param, "dstack-proc-test-", cgroups=False) as made:
        yield made


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
        proc = await start_host_job(rt, root, "flood", f"head -c {size} /dev/zero; echo done >&2")
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
        proc = await start_host_job(rt, root, "detached", script)
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


def open_fds() -> int:
    """This process's fds but sockets (as root, the job user's spawner's, kept from its first job on)."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # listdir's own
            continue
    return sum(not link.startswith("socket:") for link in links)


def test_a_stop_ends_a_job_that_ignores_sigterm_and_its_unread_output_leaves_no_pipe_open(
    runtime: tuple[HostRuntime, Path],
) -> None:
    rt, root = runtime

    async def main() -> None:
        fds_before = open_fds()
        proc = await start_host_job(rt, root, "stubborn", "trap '' TERM; echo up; while :; do sleep 0.05; done")
        chunks = cast("AsyncGenerator[tuple[int, bytes], None]", proc.output())  # HostProcess's is one
        assert await anext(chunks) == (OUT, b"up\n")  # its trap is set
        proc.grace_s = 0.2
        await proc.stop(abort=False)  # SIGTERM ignored: SIGKILL after the grace period
        assert await asyncio.wait_for(proc.wait(), 60) == -signal.SIGKILL
        await proc.cleanup()  # its output was not read to its end: the pipes are closed here
        await chunks.aclose()
        assert open_fds() == fds_before

    asyncio.run(main())
