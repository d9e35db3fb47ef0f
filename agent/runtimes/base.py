"""The runtime interface: how a job's commands become a running process (host now, Docker later)."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

# Every job process carries this variable (set by the runner): after an agent crash, the next agent
# finds the jobs its predecessor left behind by it, with no bookkeeping file per job.
AGENT_MARKER = "DSTACK_AGENT_HOME"


class RuntimeError_(Exception):
    """The runtime could not start the job (the job fails with reason `executor error`)."""


@dataclass
class RuntimeJob:
    job_id: str
    workdir: Path  # the code root; commands run in workdir / working_dir
    working_dir: str
    commands: list[str]
    env: dict[str, str]
    gpu_indices: list[int] = field(default_factory=list)
    gpu_uuids: list[str] = field(default_factory=list)
    image: str = ""
    cpu: float = 0.0
    memory_bytes: int = 0
    shm_size_bytes: int = 0


class JobProcess(abc.ABC):
    @abc.abstractmethod
    def output(self) -> AsyncIterator[tuple[int, bytes]]:
        """Yields (stream, chunk) until both stdout and stderr are closed; stream is a LogStream value."""

    @abc.abstractmethod
    async def wait(self) -> int:
        """The exit code of the job's main process (negative: killed by that signal). When it
        returns, whatever else the job started has been killed."""

    @abc.abstractmethod
    async def stop(self, abort: bool) -> None:
        """Terminates the whole process tree: SIGTERM, then SIGKILL after the grace period (at once if abort)."""


class Runtime(abc.ABC):
    name: str

    @abc.abstractmethod
    async def start(self, job: RuntimeJob) -> JobProcess: ...

    async def cleanup_leftovers(self, agent_home: str) -> None:
        """Called at agent start: jobs left by a previous run of the agent with this home are killed."""
        return None
