"""The one template the coordinator expands: `${{ run.name }}`, which only it knows when a run is named."""

from __future__ import annotations

import dataclasses
import re

from dstack.coordinator.model import JobSpec
from dstack.protos.v1 import common_pb2

_RUN_NAME = re.compile(r"\$\{\{\s*run\.name\s*\}\}")


def with_run_name(spec: common_pb2.JobSpec, run_name: str) -> common_pb2.JobSpec:
    """A copy of the spec with `${{ run.name }}` replaced in its commands, environment, paths and image."""

    def sub(text: str) -> str:
        return _RUN_NAME.sub(run_name, text) if "${{" in text else text

    out = common_pb2.JobSpec()
    out.CopyFrom(spec)
    out.commands[:] = [sub(c) for c in spec.commands]
    for k, v in spec.env.items():
        out.env[k] = sub(v)
    out.working_dir = sub(spec.working_dir)
    out.image = sub(spec.image)
    for a in out.artifacts:
        a.path = sub(a.path)
    return out


def spec_with_run_name(spec: JobSpec, run_name: str) -> JobSpec:
    """`with_run_name` on an encoded spec: only its payload changes (no field the coordinator reads
    is templated)."""
    if b"${{" not in spec.encoded:
        return spec
    rendered = with_run_name(common_pb2.JobSpec.FromString(spec.encoded), run_name)
    return dataclasses.replace(spec, encoded=rendered.SerializeToString())
