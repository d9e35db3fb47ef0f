"""Converters between the store's typed rows / domain values (coordinator/model.py) and dstack.v1
messages: the only place the two meet."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from dstack.coordinator.model import (
    WAITING,
    ArtifactFile,
    ArtifactInput,
    JobUpdate,
    LogAck,
    LogBatch,
    LogLine,
    RunStatus,
    UpdateAck,
    termination_reason,
)
from dstack.coordinator.store import JobRow, RunRow
from dstack.protos.v1 import agent_pb2, client_pb2, common_pb2


def job_to_proto(r: JobRow, pending_reasons: Mapping[str, str]) -> client_pb2.Job:
    spec = common_pb2.JobSpec()
    spec.ParseFromString(r.spec)
    j = client_pb2.Job(
        id=r.id,
        job_name=r.job_name,
        status=common_pb2.JobStatus.ValueType(r.status),
        termination_reason=common_pb2.TerminationReason.ValueType(r.termination_reason),
        message=pending_reasons.get(r.id, "") if r.status in WAITING else r.message,
        agent_name=r.agent_name,
        gpu_indices=r.gpu_indices,
        submitted_at_ns=r.submitted_at or 0,
        started_at_ns=r.started_at or 0,
        finished_at_ns=r.finished_at or 0,
        spec=spec,
    )
    if r.exit_code is not None:
        j.exit_code = r.exit_code
        j.has_exit_code = True
    return j


def run_to_proto(r: RunRow, jobs: list[JobRow], tags: list[str], pending_reasons: Mapping[str, str]) -> client_pb2.Run:
    code = common_pb2.CodeRef()
    if r.code:
        code.ParseFromString(r.code)
    job_protos = [job_to_proto(j, pending_reasons) for j in jobs]
    message = r.message
    if r.status in (RunStatus.SUBMITTED, RunStatus.PENDING):
        message = next((j.message for j in job_protos if j.message), "")
    return client_pb2.Run(
        name=r.name,
        workflow=r.workflow,
        owner=r.owner,
        status=common_pb2.RunStatus.ValueType(r.status),
        termination_reason=common_pb2.TerminationReason.ValueType(r.termination_reason),
        message=message,
        submitted_at_ns=r.submitted_at,
        finished_at_ns=r.finished_at or 0,
        code=code,
        tags=tags,
        jobs=job_protos,
    )


def inventory_from_bytes(data: bytes | None) -> common_pb2.Inventory:
    inv = common_pb2.Inventory()
    if data:
        inv.ParseFromString(data)
    return inv


# ---- logs --------------------------------------------------------------------------------------
def log_line_to_proto(ln: LogLine) -> common_pb2.LogLine:
    return common_pb2.LogLine(
        seq=ln.seq, stream=common_pb2.LogStream.ValueType(ln.stream), time_ns=ln.time_ns, text=ln.text
    )


def log_batches_from_proto(batches: Iterable[agent_pb2.LogBatch]) -> list[LogBatch]:
    return [LogBatch(b.job_id, [LogLine(ln.seq, ln.stream, ln.time_ns, ln.text) for ln in b.lines]) for b in batches]


def log_acks_to_proto(acks: Iterable[LogAck]) -> list[agent_pb2.LogAck]:
    return [agent_pb2.LogAck(job_id=a.job_id, seq=a.seq) for a in acks]


# ---- the agent's job stream --------------------------------------------------------------------
def job_updates_from_proto(updates: Iterable[agent_pb2.JobUpdate]) -> list[JobUpdate]:
    return [
        JobUpdate(
            job_id=u.job_id,
            status=u.status,
            termination_reason=termination_reason(u.termination_reason),
            message=u.message,
            exit_code=u.exit_code if u.has_exit_code else None,
            time_ns=u.time_ns,
        )
        for u in updates
    ]


def update_acks_to_proto(acks: Iterable[UpdateAck]) -> list[agent_pb2.UpdateAck]:
    return [agent_pb2.UpdateAck(job_id=a.job_id, status=common_pb2.JobStatus.ValueType(a.status)) for a in acks]


def artifact_file_to_proto(f: ArtifactFile) -> common_pb2.ArtifactFile:
    return common_pb2.ArtifactFile(job_name=f.job_name, path=f.path, size=f.size, sha256=f.sha256)


def artifact_input_to_proto(i: ArtifactInput) -> agent_pb2.ArtifactInput:
    return agent_pb2.ArtifactInput(
        run_name=i.run_name, job_name=i.job_name, files=[artifact_file_to_proto(f) for f in i.files]
    )
