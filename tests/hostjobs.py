"""Host-runtime jobs without a coordinator, as the runner drives them: the runtime under test (as the
agent's own user and, as root, as the job user) and a job's start with its preparation on the code trip.
Shared by the host-process and cgroup-pool tests."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dstack.agent import jobuser
from dstack.agent.runtimes.base import RuntimeJob
from dstack.agent.runtimes.host import HostProcess, HostRuntime

AGENT_USER, JOB_USER = "agent", "job-user"


def job_users() -> list[str]:
    """Who the jobs run as: the agent's own user, and the job user where this machine can switch to it."""
    users = [AGENT_USER]
    if os.geteuid() == 0 and shutil.which("setpriv"):
        try:
            jobuser.resolve(jobuser.DEFAULT, "host")
            users.append(JOB_USER)
        except jobuser.JobUserError:
            pass
    return users


@contextmanager
def host_runtime(user: str, prefix: str, **options: Any) -> Iterator[tuple[HostRuntime, Path]]:
    """A host runtime whose jobs run as `user` (one of job_users()), with its root in /tmp so that the job
    user can pass through; closed and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o711)
    job_user = jobuser.resolve(jobuser.DEFAULT, "host") if user == JOB_USER else None
    rt = HostRuntime(5.0, str(root), job_user=job_user, **options)
    try:
        yield rt, root
    finally:
        asyncio.run(rt.close())
        shutil.rmtree(root, ignore_errors=True)


async def start_host_job(
    rt: HostRuntime, root: Path, name: str, script: str, system_line: Callable[[str], None] = lambda _text: None
) -> HostProcess:
    """Preparation on the code trip, then the start, as the runner does them."""
    workdir = root / name
    prep = await rt.preparation(name, workdir, 0, 0.0)

    def code_trip() -> None:
        workdir.mkdir()
        if prep is not None:
            prep()

    await asyncio.to_thread(code_trip)
    job = RuntimeJob(
        job_id=name,
        workdir=workdir,
        working_dir=".",
        commands=[script],
        env={"PATH": "/usr/bin:/bin"},
        system_line=system_line,
    )
    proc = await rt.start(job)
    assert isinstance(proc, HostProcess)
    return proc
