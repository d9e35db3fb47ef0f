"""The runtime interface: how a job's commands become a running process (host processes or Docker)."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dstack.protos.artifact_paths import BadWorkingDir, working_dir_prefix

# Every job process carries this variable (set by the runner): after an agent crash, the next agent
# finds the jobs its predecessor left behind by it, with no bookkeeping file per job.
AGENT_MARKER = "DSTACK_AGENT_HOME"
# Where a python job's environment writes what it resolved to (agent/env_helper.py, agent/environment.py).
REPORT_VAR = "DSTACK_ENV_REPORT"
REPORT_FILE = ".dstack-env-report.json"
# Where a job's servers listen for the agent to reach them (the port tunnels, the dev-environment providers'
# servers, cli/providers/devenv.py): the loopback address wherever the job shares the agent's network.
LISTEN_VAR = "DSTACK_LISTEN_ADDRESS"
LOOPBACK = "127.0.0.1"


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
    provider: str = ""
    python_version: str = ""  # the python provider's `version` (a container runtime picks its image by it)
    ports: list[tuple[int, int]] = field(default_factory=list)  # (host, container)
    # Container ports of apps reached only through tunnels (a PortSpec with `app`: lab, notebook, code): a
    # bridge container publishes them on the host's loopback address, not on every interface of the host.
    loopback_ports: frozenset[int] = frozenset()
    # Absolute artifact paths: (the job's host folder, the path inside the container) to bind-mount.
    mounts: list[tuple[str, str]] = field(default_factory=list)
    # A 2022 custom provider's program: it gets the compat `dstack` module and a file for its jobs
    # (agent/provider_jobs.py provider_env).
    provider_program: bool = False
    gpus_simulated: bool = False  # simulated GPUs: the assignment goes only into the environment
    # Progress the runtime reports while starting: a system log line, and "pulling the image now".
    system_line: Callable[[str], None] = field(default=lambda _text: None)
    on_pulling: Callable[[], None] = field(default=lambda: None)


def gpu_ids(job: RuntimeJob) -> list[str]:
    """The assigned GPUs by UUID when known, else by index."""
    return job.gpu_uuids or [str(i) for i in job.gpu_indices]


def gpu_env(job: RuntimeJob) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for the assigned GPUs; empty without GPUs."""
    if not job.gpu_indices:
        return {"CUDA_VISIBLE_DEVICES": ""}
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(gpu_ids(job))}


def working_subdir(job: RuntimeJob) -> str:
    """The job's working_dir, relative to its folder; one that leads out of it is refused."""
    try:
        return working_dir_prefix(job.working_dir) or "."
    except BadWorkingDir:
        raise RuntimeError_(f"working_dir {job.working_dir!r} escapes the job's directory") from None


class JobProcess(abc.ABC):
    exit_note: str = ""  # said after the exit code when the job failed (e.g. "out of memory")
    lost: str = ""  # set when the runtime lost the job: it fails with this message (executor error)

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

    def facts(self) -> dict[str, Any]:
        """What was started, for the run's record (agent/environment.py): image, image_id, image_digests, os."""
        return {}

    async def cleanup(self) -> None:
        """Called once the output is drained: releases what the job held (its container, its cgroup)."""
        return None


class Runtime(abc.ABC):
    name: str

    def base_env(self, host_env: dict[str, str]) -> dict[str, str]:
        """What a job's environment starts from; a container keeps its image's PATH and HOME."""
        return dict(host_env) | {LISTEN_VAR: LOOPBACK}

    @abc.abstractmethod
    async def start(self, job: RuntimeJob) -> JobProcess: ...

    async def preparation(self, job_id: str, workdir: Path, memory_bytes: int, cpu: float) -> Callable[[], None] | None:
        """Blocking work start() would do for the job once its folder is complete, handed to the runner to
        run on the worker thread that unpacks its code (one trip per job for both); start() then finds
        it done. None: nothing to do. The runner calls forget() once the job has ended, started or not."""
        return None

    def forget(self, job_id: str) -> None:
        """The job has ended: what preparation() made for it and start() did not take is released."""
        return None

    def published_ports(self, ports: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """A started job's (host, container) ports as reached on this host. A host process listens
        on the host itself: on the port it was told, whatever HOST:CONTAINER said."""
        return [(container, container) for _host, container in ports]

    async def close(self) -> None:
        """Called when the agent stops, after its jobs ended: releases what the runtime holds on the host."""
        return None

    async def cleanup_leftovers(self, agent_home: str) -> None:
        """Called at agent start: jobs left by a previous run of the agent with this home are killed."""
        return None
