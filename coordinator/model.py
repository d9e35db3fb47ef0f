"""The coordinator's domain values in plain Python: what the store takes and returns.

Protobuf messages are converted to and from these only at the edges (coordinator/convert.py, the
gRPC services, the engine's agent stream). The enums keep the wire values of dstack.v1 so that a
status is the same integer in the database, in memory and on the wire
(tests/unit/test_lifecycle.py checks that they agree).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


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

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", " ")


def termination_reason(value: int | None) -> TerminationReason:
    try:
        return TerminationReason(value or 0)
    except ValueError:  # a newer agent's reason: stored as unspecified rather than refused
        return TerminationReason.UNSPECIFIED


TERMINAL_JOB = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.STOPPED})
ON_AGENT = frozenset({JobStatus.ASSIGNED, JobStatus.PULLING, JobStatus.RUNNING, JobStatus.UPLOADING})
WAITING = frozenset({JobStatus.SUBMITTED, JobStatus.PENDING})
TERMINAL_RUN = frozenset({RunStatus.DONE, RunStatus.FAILED, RunStatus.STOPPED})


@dataclass(frozen=True)
class LogLine:
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
