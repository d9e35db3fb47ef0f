"""Converters from store rows to dstack.v1 messages."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from dstack.protos.v1 import client_pb2, common_pb2

Row = dict[str, Any]
WAITING = (common_pb2.JOB_STATUS_SUBMITTED, common_pb2.JOB_STATUS_PENDING)


def job_to_proto(r: Row, pending_reasons: Mapping[str, str]) -> client_pb2.Job:
    spec = common_pb2.JobSpec()
    spec.ParseFromString(r["spec"])
    j = client_pb2.Job(
        id=r["id"],
        job_name=r["job_name"],
        status=r["status"],
        termination_reason=r["termination_reason"] or 0,  # type: ignore[arg-type]
        message=pending_reasons.get(r["id"], "") if r["status"] in WAITING else r["message"] or "",
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


def run_to_proto(r: Row, jobs: list[Row], tags: list[str], pending_reasons: Mapping[str, str]) -> client_pb2.Run:
    code = common_pb2.CodeRef()
    if r["code"]:
        code.ParseFromString(r["code"])
    job_protos = [job_to_proto(j, pending_reasons) for j in jobs]
    message = r["message"] or ""
    if r["status"] in (common_pb2.RUN_STATUS_SUBMITTED, common_pb2.RUN_STATUS_PENDING):
        message = next((j.message for j in job_protos if j.message), "")
    return client_pb2.Run(
        name=r["name"],
        workflow=r["workflow"],
        owner=r["owner"],
        status=r["status"],
        termination_reason=r["termination_reason"] or 0,  # type: ignore[arg-type]
        message=message,
        submitted_at_ns=r["submitted_at"],
        finished_at_ns=r["finished_at"] or 0,
        code=code,
        tags=tags,
        jobs=job_protos,
    )


def inventory_from_bytes(data: bytes | None) -> common_pb2.Inventory:
    inv = common_pb2.Inventory()
    if data:
        inv.ParseFromString(data)
    return inv
