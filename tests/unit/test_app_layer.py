"""coordinator/app knows nothing about gRPC or dstack.v1 messages (one listed exception), and the
domain values convert to and from dstack.v1 without loss."""

from __future__ import annotations

import ast
from pathlib import Path

from dstack.coordinator import convert
from dstack.coordinator.model import (
    CodeRef,
    CompletedUpload,
    FileSize,
    GpuInfo,
    Inventory,
    JobStatus,
    JobView,
    RunStatus,
    RunView,
    TerminationReason,
    UploadGrant,
)
from dstack.protos.v1 import common_pb2

APP = Path(__file__).resolve().parents[2] / "coordinator" / "app"

# Modules allowed to import dstack.v1 messages, and why.
PROTOBUF_ALLOWED = {
    # Relays the agent protocol (one front end, gRPC): the engine reads and answers its messages as
    # they are, and converts their contents where they are stored.
    "agent_stream.py",
}


def imported_modules(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_the_app_layer_imports_no_grpc_and_no_protobuf() -> None:
    modules = sorted(APP.glob("*.py"))
    assert len(modules) > 5
    for path in modules:
        names = imported_modules(path)
        assert not [n for n in names if n == "grpc" or n.startswith("grpc.")], f"{path.name} imports grpc"
        assert not [n for n in names if n.startswith("google.protobuf")], f"{path.name} imports protobuf"
        if path.name not in PROTOBUF_ALLOWED:
            protos = [n for n in names if n.startswith("dstack.protos")]
            assert not protos, f"{path.name} imports {protos}: convert in coordinator/convert.py, from the servicers"


def test_the_exceptions_are_still_needed() -> None:
    for name in PROTOBUF_ALLOWED:
        assert any(n.startswith("dstack.protos") for n in imported_modules(APP / name)), name


def test_inventory_round_trips() -> None:
    inv = Inventory(
        hostname="h",
        cpu_count=8,
        memory_total_bytes=1 << 34,
        memory_available_bytes=1 << 33,
        disk_free_bytes=1 << 40,
        gpus=[GpuInfo(0, "u0", "H200", 1 << 37, 1 << 30, 50, 60, simulated=True), GpuInfo(1)],
        runtime="docker",
        max_jobs=4,
    )
    assert convert.inventory_from_bytes(convert.inventory_to_bytes(inv)) == inv
    assert convert.inventory_from_bytes(b"") == Inventory()


def test_a_job_spec_keeps_its_payload_and_exposes_what_the_coordinator_reads() -> None:
    msg = common_pb2.JobSpec(
        job_name="train",
        workflow="wf",
        commands=["python train.py"],
        depends_on=["prep"],
        input_tags=["data"],
        input_workflows=["prep-wf"],
        needs_container=True,
        resources=common_pb2.Resources(
            cpu=2.5, memory_bytes=1 << 30, gpu=common_pb2.GpuRequest(count=2, name="h200", memory_bytes=1 << 36)
        ),
    )
    spec = convert.job_spec_from_proto(msg)
    assert common_pb2.JobSpec.FromString(spec.encoded) == msg
    assert (spec.job_name, spec.workflow, spec.depends_on) == ("train", "wf", ("prep",))
    assert (spec.input_tags, spec.input_workflows, spec.needs_container) == (("data",), ("prep-wf",), True)
    r = spec.resources
    assert (r.cpu, r.memory_bytes, r.gpu_count, r.gpu_name, r.gpu_memory_bytes) == (2.5, 1 << 30, 2, "h200", 1 << 36)
    assert convert.job_spec_from_bytes(spec.encoded) == spec


def test_a_run_view_on_the_wire() -> None:
    spec = common_pb2.JobSpec(job_name="a").SerializeToString()
    code = CodeRef("f" * 64, 10, "https://x/repo.git", "main", "abc", dirty=True)
    run = RunView(
        name="run-1",
        workflow="wf",
        owner="admin",
        status=RunStatus.FAILED,
        submitted_at_ns=1,
        termination_reason=TerminationReason.EXIT_CODE,
        message="exit code 3",
        finished_at_ns=5,
        code=code,
        tags=["t"],
        jobs=[
            JobView("j1", "a", JobStatus.FAILED, spec, TerminationReason.EXIT_CODE, "m", "agent", [0, 1], 3, 1, 2, 5),
            JobView("j2", "b", JobStatus.STOPPED, spec),
        ],
    )
    msg = convert.run_to_proto(run)
    assert (msg.name, msg.status, msg.termination_reason) == ("run-1", common_pb2.RUN_STATUS_FAILED, 2)
    assert convert.code_from_proto(msg.code) == code and convert.code_from_bytes(convert.code_to_bytes(code)) == code
    assert list(msg.tags) == ["t"] and msg.message == "exit code 3" and msg.finished_at_ns == 5
    a, b = msg.jobs
    assert (a.status, a.exit_code, a.has_exit_code, list(a.gpu_indices)) == (
        common_pb2.JOB_STATUS_FAILED,
        3,
        True,
        [0, 1],
    )
    assert (a.agent_name, a.started_at_ns, a.spec.job_name) == ("agent", 2, "a")
    assert (b.status, b.has_exit_code) == (common_pb2.JOB_STATUS_STOPPED, False)


def test_transfers_on_the_wire() -> None:
    files = [common_pb2.FileSize(path="a/b", size=3)]
    assert convert.file_sizes_from_proto(files) == [FileSize("a/b", 3)]
    done = [common_pb2.CompletedUpload(path="p", upload_id="u", etags=["e1", "e2"])]
    assert convert.completed_uploads_from_proto(done) == [CompletedUpload("p", "u", ["e1", "e2"])]
    grant = UploadGrant("p", "", "u", 5 << 20, ["http://1", "http://2"])
    assert convert.upload_grant_to_proto(grant) == common_pb2.UploadGrant(
        path="p", upload_id="u", part_size=5 << 20, part_urls=["http://1", "http://2"]
    )
