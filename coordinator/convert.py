"""Converters between the coordinator's domain values (coordinator/model.py) and dstack.v1 messages:
the only place the two meet.

Two kinds: the wire (`*_to_proto`, `*_from_proto`), called by the servicers and the engine's agent
stream; and the stored blobs (`*_to_bytes`, `*_from_bytes`): specs, code refs and inventories are
kept in SQLite as serialized dstack.v1 messages, so the use cases of coordinator/app encode and
decode them through here, with plain values on their side.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any

from dstack.coordinator import stored
from dstack.coordinator.model import (
    AgentView,
    ArtifactFile,
    ArtifactInput,
    CodeRef,
    CompletedUpload,
    FileSize,
    GpuInfo,
    Inventory,
    JobSpec,
    JobUpdate,
    JobView,
    LogAck,
    LogBatch,
    LogLine,
    Resources,
    RetryPolicy,
    RunView,
    UpdateAck,
    UploadGrant,
    termination_reason,
)
from dstack.coordinator.records import environment_record
from dstack.protos.urls import public_repo_url
from dstack.protos.v1 import agent_pb2, client_pb2, common_pb2


# ---- job specs -----------------------------------------------------------------------------------
def job_spec_from_proto(spec: common_pb2.JobSpec) -> JobSpec:
    r = spec.resources
    return JobSpec(
        encoded=spec.SerializeToString(),
        job_name=spec.job_name,
        workflow=spec.workflow,
        resources=Resources(
            cpu=r.cpu,
            memory_bytes=r.memory_bytes,
            gpu_count=r.gpu.count,
            gpu_name=r.gpu.name,
            gpu_memory_bytes=r.gpu.memory_bytes,
            nodes=max(1, r.nodes),
        ),
        needs_container=spec.needs_container,
        depends_on=tuple(spec.depends_on),
        input_tags=tuple(spec.input_tags),
        input_workflows=tuple(spec.input_workflows),
        retry=RetryPolicy(spec.retry.limit, tuple(spec.retry.on)) if spec.HasField("retry") else None,
        max_duration_s=spec.max_duration_s,
        interruptible=r.interruptible,
        gang=spec.gang,
        node_rank=spec.node_rank,
        nnodes=max(1, spec.nnodes),
        cache=spec.cache,
    )


def job_spec_from_bytes(data: bytes) -> JobSpec:
    return job_spec_from_proto(common_pb2.JobSpec.FromString(data))


def job_spec_proto(data: bytes) -> common_pb2.JobSpec:
    return common_pb2.JobSpec.FromString(data)


def job_spec_image(data: bytes) -> str:
    return common_pb2.JobSpec.FromString(data).image


def job_spec_gang(data: bytes) -> str:
    return common_pb2.JobSpec.FromString(data).gang


def pinned_job_spec(spec: JobSpec, image: str, env: dict[str, str], first_command: str) -> JobSpec:
    """`dstack rerun --pin` (app/rerun.py): the spec with its image replaced (if given), variables added to its
    environment, and a command run before its own (if given)."""
    proto = common_pb2.JobSpec.FromString(spec.encoded)
    if image:
        proto.image = image
    for k, v in env.items():
        proto.env[k] = v
    if first_command:
        proto.commands.insert(0, first_command)
    return job_spec_from_proto(proto)


# ---- code refs -----------------------------------------------------------------------------------
def code_from_proto(c: common_pb2.CodeRef) -> CodeRef:
    # The CLI strips credentials from the remote URL; an older or hostile client may not, and rows
    # stored before that still hold them: never store, show or hand a job a token (protos/urls.py).
    return CodeRef(
        c.hash,
        c.size,
        public_repo_url(c.repo_url),
        c.branch,
        c.commit,
        c.dirty,
        c.diff_hash,
        c.diff_size,
        tuple(c.untracked),
    )


def code_to_proto(c: CodeRef) -> common_pb2.CodeRef:
    return common_pb2.CodeRef(
        hash=c.hash,
        size=c.size,
        repo_url=c.repo_url,
        branch=c.branch,
        commit=c.commit,
        dirty=c.dirty,
        diff_hash=c.diff_hash,
        diff_size=c.diff_size,
        untracked=list(c.untracked),
    )


def job_spec_dict(spec: common_pb2.JobSpec) -> dict[str, Any]:
    """A job spec as plain JSON for the run's record (field names as in protos/v1/common.proto)."""
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(spec, preserving_proto_field_name=True)


def code_from_bytes(data: bytes) -> CodeRef:
    # Cached: every GetRun and listed run decodes its run's stored ref (and checks its URL), and runs share
    # few refs. A CodeRef is immutable. Large refs (thousands of untracked files) are decoded each time, so
    # that the cache stays small (at most 1024 x 4 KiB).
    return _code_from_small_bytes(data) if len(data) <= 4096 else _code_from_bytes(data)


def _code_from_bytes(data: bytes) -> CodeRef:
    return code_from_proto(common_pb2.CodeRef.FromString(data)) if data else CodeRef()


_code_from_small_bytes = functools.lru_cache(maxsize=1024)(_code_from_bytes)


def code_to_bytes(c: CodeRef) -> bytes:
    return code_to_proto(c).SerializeToString()


# ---- runs ----------------------------------------------------------------------------------------
def job_to_proto(j: JobView) -> client_pb2.Job:
    out = client_pb2.Job(
        id=j.id,
        job_name=j.job_name,
        status=common_pb2.JobStatus.ValueType(j.status),
        termination_reason=common_pb2.TerminationReason.ValueType(j.termination_reason),
        agent_name=j.agent_name,
        gpu_indices=j.gpu_indices,
        submitted_at_ns=j.submitted_at_ns,
        started_at_ns=j.started_at_ns,
        finished_at_ns=j.finished_at_ns,
        queue_position=j.queue_position,
        wait_reason=j.wait_reason,
        eta_ns=j.eta_ns,
        attempt=j.attempt,
        ports=[common_pb2.PortSpec(host_port=h, container_port=c) for h, c in j.ports],
        attempts=[
            client_pb2.JobAttempt(
                attempt=a.attempt,
                agent_name=a.agent_name,
                status=common_pb2.JobStatus.ValueType(a.status),
                termination_reason=common_pb2.TerminationReason.ValueType(a.termination_reason),
                message=a.message,
                started_at_ns=a.started_at_ns,
                finished_at_ns=a.finished_at_ns,
            )
            for a in j.attempts
        ],
    )
    # Parsed once, into its place (not parsed and then copied); a damaged one shows as such.
    out.message = (
        j.message if stored.merge_spec(out.spec, j.id, j.spec) else stored.with_marker(j.message, stored.SPEC_DAMAGED)
    )
    if j.exit_code is not None:
        out.exit_code = j.exit_code
        out.has_exit_code = True
    return out


def run_to_proto(r: RunView) -> client_pb2.Run:
    return client_pb2.Run(
        name=r.name,
        workflow=r.workflow,
        owner=r.owner,
        status=common_pb2.RunStatus.ValueType(r.status),
        termination_reason=common_pb2.TerminationReason.ValueType(r.termination_reason),
        message=r.message,
        submitted_at_ns=r.submitted_at_ns,
        finished_at_ns=r.finished_at_ns,
        code=code_to_proto(r.code),
        tags=r.tags,
        jobs=[job_to_proto(j) for j in r.jobs],
        repository=r.repository,
    )


# ---- agents --------------------------------------------------------------------------------------
def _scalars(value: object, cls: type[object], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of dataclass `cls` read from `value` (a message or a dataclass with the same names)."""
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(cls) if f.name not in skip}  # type: ignore[arg-type]


# Inventory and GpuInfo carry the message's field names one to one (test_app_layer round-trips them).
def inventory_from_proto(inv: common_pb2.Inventory) -> Inventory:
    return Inventory(
        **_scalars(inv, Inventory, skip=("gpus",)), gpus=[GpuInfo(**_scalars(g, GpuInfo)) for g in inv.gpus]
    )


def inventory_to_proto(inv: Inventory) -> common_pb2.Inventory:
    return common_pb2.Inventory(
        **_scalars(inv, Inventory, skip=("gpus",)), gpus=[common_pb2.GpuInfo(**_scalars(g, GpuInfo)) for g in inv.gpus]
    )


def inventory_from_bytes(data: bytes | None) -> Inventory:
    return inventory_from_proto(common_pb2.Inventory.FromString(data)) if data else Inventory()


def inventory_to_bytes(inv: Inventory) -> bytes:
    return inventory_to_proto(inv).SerializeToString()


def agent_to_proto(a: AgentView) -> client_pb2.Agent:
    return client_pb2.Agent(
        id=a.id,
        name=a.name,
        status=a.status,
        inventory=inventory_to_proto(a.inventory),
        running_jobs=a.running_jobs,
        last_heartbeat_ns=a.last_heartbeat_ns,
        busy_gpu_indices=a.busy_gpu_indices,
    )


# ---- transfers -----------------------------------------------------------------------------------
def file_sizes_from_proto(files: Iterable[common_pb2.FileSize]) -> list[FileSize]:
    return [FileSize(f.path, f.size) for f in files]


def completed_uploads_from_proto(completed: Iterable[common_pb2.CompletedUpload]) -> list[CompletedUpload]:
    return [CompletedUpload(c.path, c.upload_id, list(c.etags)) for c in completed]


def upload_grant_to_proto(g: UploadGrant) -> common_pb2.UploadGrant:
    return common_pb2.UploadGrant(
        path=g.path, url=g.url, upload_id=g.upload_id, part_size=g.part_size, part_urls=g.part_urls
    )


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
            ports=[(p.host_port, p.container_port) for p in u.ports],
            provided_jobs=[s.SerializeToString() for s in u.provided_jobs],
        )
        for u in updates
    ]


def environment_from_proto(e: common_pb2.JobEnvironment) -> dict[str, Any]:
    """A job's environment as its agent reported it, bounded and sanitised for the run's record."""
    return environment_record(
        runtime=e.runtime,
        image=e.image,
        image_id=e.image_id,
        image_digests=e.image_digests,
        python_version=e.python_version,
        os=e.os,
        packages=e.packages,
        packages_truncated=e.packages_truncated,
        phase_ns=dict(e.phase_ns),
        agent_version=e.agent_version,
        gpus=[
            {
                "index": g.index,
                "name": g.name,
                "uuid": g.uuid,
                "memory_total_bytes": g.memory_total_bytes,
                "simulated": g.simulated,
            }
            for g in e.gpus
        ],
        driver_version=e.driver_version,
        cuda_version=e.cuda_version,
    )


def update_acks_to_proto(acks: Iterable[UpdateAck]) -> list[agent_pb2.UpdateAck]:
    return [agent_pb2.UpdateAck(job_id=a.job_id, status=common_pb2.JobStatus.ValueType(a.status)) for a in acks]


def artifact_file_to_proto(f: ArtifactFile) -> common_pb2.ArtifactFile:
    return common_pb2.ArtifactFile(job_name=f.job_name, path=f.path, size=f.size, sha256=f.sha256)


def artifact_input_to_proto(i: ArtifactInput) -> agent_pb2.ArtifactInput:
    return agent_pb2.ArtifactInput(
        run_name=i.run_name,
        job_name=i.job_name,
        files=[artifact_file_to_proto(f) for f in i.files],
        mount_paths=list(i.mount_paths),
    )


def job_ports(encoded_spec: bytes) -> list[tuple[int, int]]:
    """(host, container) of each port a stored job spec declares (what a tunnel may reach)."""
    spec = common_pb2.JobSpec.FromString(encoded_spec)
    return [(p.host_port, p.container_port) for p in spec.ports]
