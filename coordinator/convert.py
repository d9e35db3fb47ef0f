"""Converters from store rows to dstack.v1 messages."""

from __future__ import annotations

import json
from typing import Any

from protos.v1 import client_pb2, common_pb2

Row = dict[str, Any]


def job_to_proto(r: Row) -> client_pb2.Job:
    spec = common_pb2.JobSpec()
    spec.ParseFromString(r["spec"])
    j = client_pb2.Job(
        id=r["id"],
        job_name=r["job_name"],
        status=r["status"],
        termination_reason=r["termination_reason"] or 0,  # type: ignore[arg-type]
        message=r["message"] or "",
        agent_name=r.get("agent_name") or "",
        gpu_indices=json.loads(r["gpu_indices"] or "[]"),
        submitted_at_ns=r["submitted_at"] or 0,
        started_at_ns=r["started_at"] or 0,
        finished_at_ns=r["finished_at"] or 0,
        spec=spec,
    )
    if r["exit_code"] is not None:
        j.exit_code = r["exit_code"]
        j.has_exit_code = True
    return j


def run_to_proto(r: Row, jobs: list[Row], tags: list[str]) -> client_pb2.Run:
    code = common_pb2.CodeRef()
    if r["code"]:
        code.ParseFromString(r["code"])
    return client_pb2.Run(
        name=r["name"],
        workflow=r["workflow"],
        owner=r["owner"],
        status=r["status"],
        termination_reason=r["termination_reason"] or 0,  # type: ignore[arg-type]
        message=r["message"] or "",
        submitted_at_ns=r["submitted_at"],
        finished_at_ns=r["finished_at"] or 0,
        code=code,
        tags=tags,
        jobs=[job_to_proto(j) for j in jobs],
    )


def inventory_from_bytes(data: bytes | None) -> common_pb2.Inventory:
    inv = common_pb2.Inventory()
    if data:
        inv.ParseFromString(data)
    return inv
