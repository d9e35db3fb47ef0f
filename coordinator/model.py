"""The coordinator's domain values in plain Python: what the store takes and returns, and what the
use cases of coordinator/app take and return (the `*View`s, specs, inventories, transfer grants).

Protobuf messages are converted to and from these only at the edges (coordinator/convert.py, the
gRPC services, the engine's agent stream). The enums keep the wire values of dstack.v1 so that a
status is the same integer in the database, in memory and on the wire
(tests/unit/test_lifecycle.py checks that they agree).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple


class JobStatus(enum.IntEnum):
    SUBMITTED = 1
    PENDING = 2
    ASSIGNED = 3
    RUNNING = 4
    UPLOADING = 5
    DONE = 6
    FAILED = 7
    STOPPED = 8
    PULLING = 9

    @property
    def label(self) -> str:
        return self.name.lower()


class RunStatus(enum.IntEnum):
    SUBMITTED = 1
    PENDING = 2
    RUNNING = 3
    UPLOADING = 4
    DONE = 5
    FAILED = 6
    STOPPED = 7
    PULLING = 8

    @property
    def label(self) -> str:
        return self.name.lower()


class TerminationReason(enum.IntEnum):
    UNSPECIFIED = 0  # not finished (or finished by an old agent that said no reason)
    DONE = 1
    EXIT_CODE = 2
    STOPPED_BY_USER = 3
    AGENT_LOST = 4
    UNSCHEDULABLE = 5
    EXECUTOR_ERROR = 6
    DEPENDENCY_FAILED = 7
    ARTIFACT_UPLOAD_FAILED = 8
    PREEMPTED = 20
    MAX_DURATION = 21
    DISK_FULL = 22  # its agent's disk was full (agent/diskspace.py): requeued within a bound
    GANG_FAILED = 30  # another node of its multi-node gang failed

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", " ")


class LogStream(enum.IntEnum):
    UNSPECIFIED = 0
    STDOUT = 1
    STDERR = 2
    SYSTEM = 3  # lines written by dstack itself


def termination_reason(value: int | None) -> TerminationReason:
    try:
        return TerminationReason(value or 0)
    except ValueError:  # a newer agent's reason: stored as unspecified rather than refused
        return TerminationReason.UNSPECIFIED


TERMINAL_JOB = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.STOPPED})
ON_AGENT = frozenset({JobStatus.ASSIGNED, JobStatus.PULLING, JobStatus.RUNNING, JobStatus.UPLOADING})
WAITING = frozenset({JobStatus.SUBMITTED, JobStatus.PENDING})
TERMINAL_RUN = frozenset({RunStatus.DONE, RunStatus.FAILED, RunStatus.STOPPED})


class LogLine(NamedTuple):
    """A tuple, not a dataclass: a followed job printing 200,000 lines a second makes one per line."""

    seq: int
    stream: int  # dstack.v1.LogStream's number: the store only keeps it
    time_ns: int
    text: str


@dataclass(frozen=True)
class LogBatch:
    job_id: str
    lines: list[LogLine]  # consecutive seqs


@dataclass(frozen=True)
class LogAck:
    job_id: str
    seq: int  # every line up to and including seq is stored


@dataclass(frozen=True)
class JobUpdate:
    """A job's state as its agent reports it."""

    job_id: str
    status: int  # a JobStatus number; an unknown one is acknowledged and ignored
    termination_reason: TerminationReason = TerminationReason.UNSPECIFIED
    message: str = ""
    exit_code: int | None = None
    time_ns: int = 0  # when it happened on the agent; 0: unknown (the coordinator's clock is used)
    ports: list[tuple[int, int]] = field(default_factory=list)  # with RUNNING: (host, container) on the agent
    provided_jobs: list[bytes] = field(default_factory=list)  # with DONE: a provider program's jobs (encoded)


@dataclass(frozen=True)
class UpdateAck:
    job_id: str
    status: int


@dataclass(frozen=True)
class ArtifactFile:
    job_name: str
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ArtifactInput:
    """The recorded artifacts of one job, that another job starts with."""

    run_name: str
    job_name: str
    files: list[ArtifactFile] = field(default_factory=list)
    # The producer's absolute artifact paths: mounted at the same paths in the dependant's container.
    mount_paths: tuple[str, ...] = ()


# ---- what a client submits and sees --------------------------------------------------------------
@dataclass(frozen=True)
class CodeRef:
    hash: str = ""  # sha256 of the packed tarball; "" for a run without code
    size: int = 0
    repo_url: str = ""
    branch: str = ""
    commit: str = ""
    dirty: bool = False
    # The uncommitted diff (a code blob of its own) and the untracked files in the tree, kept apart
    # for the run's record (docs/reproducibility.md).
    diff_hash: str = ""
    diff_size: int = 0
    untracked: tuple[str, ...] = ()


@dataclass(frozen=True)
class Resources:
    cpu: float = 0.0  # cores; 0: no reservation
    memory_bytes: int = 0
    gpu_count: int = 0
    gpu_name: str = ""  # case-insensitive substring of the GPU name; "" for any
    gpu_memory_bytes: int = 0  # minimum per GPU; 0 for any
    nodes: int = 1  # > 1: a gang of this many jobs, one per agent (docs/multinode.md)


@dataclass(frozen=True)
class JobSpec:
    """A job spec as the coordinator handles it: an opaque, encoded payload plus the few fields it reads.

    Opaque because the coordinator only stores a spec and hands it to an agent as it came (bar the
    `${{ run.name }}` template, coordinator/templates.py): its commands, env, image, ports, artifacts
    are the provider's and the agent's business. A plain copy of all fifteen fields would be a second
    schema to keep in step with dstack.v1.JobSpec that nothing here reads. `encoded` is the
    serialized dstack.v1.JobSpec (convert.job_spec_from_proto builds both halves from one message,
    so they agree); the fields below are what validation, scheduling and dependencies use.
    """

    encoded: bytes
    job_name: str
    workflow: str = ""
    resources: Resources = field(default_factory=Resources)
    needs_container: bool = False
    depends_on: tuple[str, ...] = ()  # job names in the same run
    input_tags: tuple[str, ...] = ()
    input_workflows: tuple[str, ...] = ()
    retry: RetryPolicy | None = None  # None: no `retry` field
    max_duration_s: int = 0  # 0: no limit
    interruptible: bool = False
    # A member of a multi-node gang (set by the coordinator when it expands resources.nodes): the
    # name the members share ("" for a job of its own), its rank, and the gang's size.
    gang: str = ""
    node_rank: int = 0
    nnodes: int = 1
    cache: bool = False  # the step cache may reuse a done job's artifacts (coordinator/cache.py)


@dataclass(frozen=True)
class RetryPolicy:
    limit: int  # new attempts at most
    on: tuple[str, ...]  # agent-lost, preempted, error (coordinator/lifecycle/attempts.py)


@dataclass(frozen=True)
class AttemptView:
    """An attempt of a job that ended without ending the job (it was requeued)."""

    attempt: int
    agent_name: str
    status: JobStatus
    termination_reason: TerminationReason
    message: str
    started_at_ns: int = 0
    finished_at_ns: int = 0


@dataclass(frozen=True)
class JobView:
    id: str
    job_name: str
    status: JobStatus
    spec: bytes  # the encoded dstack.v1.JobSpec, as submitted with the run's name filled in (JobSpec)
    termination_reason: TerminationReason = TerminationReason.UNSPECIFIED
    message: str = ""  # why it is waiting, or why it ended
    agent_name: str = ""
    gpu_indices: list[int] = field(default_factory=list)
    exit_code: int | None = None
    submitted_at_ns: int = 0
    started_at_ns: int = 0
    finished_at_ns: int = 0
    # While waiting (coordinator/planner.py): position in the scheduler's order (0: not in it), why
    # (planner's reason constants), and the expected start (0: unknown).
    queue_position: int = 0
    wait_reason: str = ""
    eta_ns: int = 0
    attempt: int = 1
    attempts: list[AttemptView] = field(default_factory=list)  # the earlier ones, oldest first
    ports: list[tuple[int, int]] = field(default_factory=list)  # (host, container) the attempt got on its agent


@dataclass(frozen=True)
class RunView:
    """A run as clients see it."""

    name: str
    workflow: str
    owner: str
    status: RunStatus
    submitted_at_ns: int
    termination_reason: TerminationReason = TerminationReason.UNSPECIFIED
    message: str = ""
    finished_at_ns: int = 0
    code: CodeRef = field(default_factory=CodeRef)
    tags: list[str] = field(default_factory=list)
    jobs: list[JobView] = field(default_factory=list)
    repository: str = ""


# ---- agents --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str = ""
    name: str = ""
    memory_total_bytes: int = 0
    memory_used_bytes: int = 0
    utilization_percent: int = 0
    temperature_c: int = 0
    simulated: bool = False


@dataclass(frozen=True)
class Inventory:
    hostname: str = ""
    cpu_count: int = 0
    memory_total_bytes: int = 0
    memory_available_bytes: int = 0
    disk_free_bytes: int = 0
    gpus: list[GpuInfo] = field(default_factory=list)
    runtime: str = ""  # "host", "null" or "docker"
    max_jobs: int = 0  # concurrent job slots
    advertise_address: str = ""  # where other agents reach it (a gang's MASTER_ADDR; docs/multinode.md)
    # Its work folder, the free space it keeps there (--min-free-disk), and whether it is below that:
    # a disk-full agent is draining (the scheduler places nothing on it) until space is back.
    work_dir: str = ""
    min_free_disk_bytes: int = 0
    disk_full: bool = False


@dataclass(frozen=True)
class AgentView:
    id: str
    name: str
    status: str  # online, lost
    inventory: Inventory
    running_jobs: int
    last_heartbeat_ns: int
    busy_gpu_indices: list[int] = field(default_factory=list)


# ---- object-store transfers without credentials (the coordinator presigns) -----------------------
@dataclass(frozen=True)
class FileSize:
    path: str
    size: int


@dataclass(frozen=True)
class UploadGrant:
    """One presigned PUT (`url`), or a multipart upload: a presigned PUT per part of `part_size` bytes."""

    path: str
    url: str = ""
    upload_id: str = ""
    part_size: int = 0
    part_urls: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CompletedUpload:
    """A multipart upload the sender finished: the coordinator completes it with the parts' etags."""

    path: str
    upload_id: str
    etags: list[str] = field(default_factory=list)
