"""Reads .dstack/workflows.yaml into typed Workflow specs, with file:line errors."""

from __future__ import annotations

from pathlib import Path

from cli import fields
from cli.errors import CliError, WorkflowError
from cli.providers import load_provider
from cli.spec import Artifact, Workflow
from cli.yamlsrc import Node, Seq, load
from protos.v1 import common_pb2

COMMON_FIELDS = {
    "name",
    "help",
    "provider",
    "depends-on",
    "artifacts",
    "resources",
    "environment",
    "working_dir",
}
RESOURCE_FIELDS = {"gpu", "cpu", "memory", "shm_size", "interruptible"}
GPU_FIELDS = {"count", "name", "memory"}
MAX_GPUS = 1024


def find_project_root(start: Path) -> Path:
    """The nearest folder at or above `start` that has .dstack/workflows.yaml."""
    for d in [start, *start.parents]:
        if (d / ".dstack" / "workflows.yaml").is_file():
            return d
    raise CliError(f"no .dstack/workflows.yaml in {start} or above it: run `dstack init` or create one")


def load_workflows(root: Path) -> dict[str, Workflow]:
    path = root / ".dstack" / "workflows.yaml"
    data = load(path)
    if data is None:
        return {}
    if not isinstance(data, Node) or "workflows" not in data:
        raise WorkflowError("expected a top-level 'workflows:' list", getattr(data, "location", None))
    fields.check_unknown(data, {"workflows"}, "the file")
    items = data["workflows"]
    if items is None:
        return {}
    if not isinstance(items, Seq):
        raise WorkflowError("'workflows' must be a list", data.at("workflows"))
    out: dict[str, Workflow] = {}
    for i, node in enumerate(items):
        if not isinstance(node, Node):
            raise WorkflowError("each workflow must be a mapping with name and provider", items.item_locations[i])
        wf = parse_workflow(node)
        if wf.name in out:
            raise WorkflowError(
                f"workflow {wf.name!r} is defined twice (first at line {out[wf.name].location.line})",
                node.at("name"),
            )
        out[wf.name] = wf
    return out


def parse_workflow(node: Node) -> Workflow:
    name = fields.string(node, "name", required=True)
    provider_name = fields.string(node, "provider", required=True)
    provider = load_provider(provider_name, node)
    fields.check_unknown(node, COMMON_FIELDS | set(provider.fields), f"workflow {name!r}")
    wf = Workflow(
        name=name,
        provider=provider_name,
        node=node,
        location=node.location,
        help=fields.string(node, "help"),
        depends_on=_depends_on(node),
        artifacts=_artifacts(node),
        resources=_resources(node),
        env=_environment(node),
        working_dir=fields.relative_path(node, "working_dir", fields.string(node, "working_dir", default=".")),
    )
    provider.validate(wf)
    return wf


def _depends_on(node: Node) -> list[str]:
    deps = fields.string_list(node, "depends-on")
    if deps:
        # Refused rather than ignored: running a workflow without its dependency would be wrong.
        raise WorkflowError(
            "depends-on is not supported yet by this version of dstack (runtime and tag dependencies come"
            " with the workflow-language work); remove it and run the dependency first",
            node.at("depends-on"),
        )
    return deps


def _artifacts(node: Node) -> list[Artifact]:
    return [Artifact(fields.relative_path(node, "artifacts", p)) for p in fields.string_list(node, "artifacts")]


def _environment(node: Node) -> dict[str, str]:
    env = node.get("environment")
    if env is None:
        return {}
    if not isinstance(env, Node):
        raise WorkflowError("'environment' must be a mapping of NAME: value", node.at("environment"))
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _resources(node: Node) -> common_pb2.Resources:
    r = node.get("resources")
    if r is None:
        return common_pb2.Resources()
    if not isinstance(r, Node):
        raise WorkflowError("'resources' must be a mapping (gpu, cpu, memory...)", node.at("resources"))
    fields.check_unknown(r, RESOURCE_FIELDS, "resources")
    out = common_pb2.Resources(
        cpu=fields.number(r, "cpu"),
        memory_bytes=fields.size_bytes(r, "memory"),
        shm_size_bytes=fields.size_bytes(r, "shm_size"),
    )
    interruptible = r.get("interruptible", False)
    if not isinstance(interruptible, bool):
        raise WorkflowError("'interruptible' must be true or false", r.at("interruptible"))
    out.interruptible = interruptible
    gpu = r.get("gpu")
    if isinstance(gpu, Node):
        fields.check_unknown(gpu, GPU_FIELDS, "resources.gpu")
        out.gpu.count = fields.whole_number(gpu, "count", 0, MAX_GPUS) if "count" in gpu else 1
        out.gpu.name = fields.string(gpu, "name")
        out.gpu.memory_bytes = fields.size_bytes(gpu, "memory")
    elif gpu is not None:
        if isinstance(gpu, bool) or not isinstance(gpu, int):
            raise WorkflowError("'gpu' must be a whole number or {count, name, memory}", r.at("gpu"))
        if not 0 <= gpu <= MAX_GPUS:
            raise WorkflowError(f"'gpu' must be >= 0 and at most {MAX_GPUS}, got {gpu}", r.at("gpu"))
        out.gpu.count = gpu
    return out
