"""Reads .dstack/workflows.yaml into typed Workflow specs, with file:line errors."""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import sys
from pathlib import Path
from typing import Any

from dstack.cli import early2022, fields
from dstack.cli.dependencies import Dependencies as Dependencies  # re-exported
from dstack.cli.dependencies import dependencies as dependencies
from dstack.cli.dependencies import strings_in
from dstack.cli.errors import CliError, Location, WorkflowError
from dstack.cli.providers import resolve_provider
from dstack.cli.spec import Artifact, Workflow
from dstack.cli.yamlsrc import Node, Seq, load
from dstack.protos.artifact_paths import in_code
from dstack.protos.container_paths import BadContainerPath, check_container_path, check_disjoint, is_container_path
from dstack.protos.v1 import common_pb2

# The fields every workflow may have, as JSON Schema: the loader accepts exactly these names (plus
# the provider's own), and docs/workflows.schema.json is generated from the same tables (cli/schema.py).
_STR = {"type": "string"}
_STR_LIST = {"type": "array", "items": _STR}
_SIZE = {
    "type": ["string", "integer"],
    "description": "bytes, or a size: 512MB, 64GB (decimal: GB = 10^9 bytes), 1.5GiB or 1.5Gi (binary: 2^30)",
}
GPU_SCHEMA: dict[str, Any] = {
    "count": {"type": "integer", "minimum": 0, "maximum": 1024},
    "name": {"type": "string", "description": "matches GPU names case-insensitively, e.g. A100"},
    "memory": {**_SIZE, "description": "minimum memory per GPU"},
}
RESOURCE_SCHEMA: dict[str, Any] = {
    "gpu": {
        "oneOf": [
            {"type": "integer", "minimum": 0, "maximum": 1024},
            {"type": "object", "properties": GPU_SCHEMA, "additionalProperties": False},
        ]
    },
    "cpu": {"type": "number", "minimum": 0},
    "memory": _SIZE,
    "shm_size": _SIZE,
    "interruptible": {"type": "boolean"},
    "local": {
        "type": "boolean",
        "deprecated": True,
        "description": "2022: run on this machine; ignored (the coordinator dstack is set up for decides), with a note",
    },
    "remote": {
        "type": "boolean",
        "deprecated": True,
        "description": "2022: run in the cloud; ignored (the coordinator dstack is set up for decides), with a note",
    },
    "nodes": {
        "type": "integer",
        "minimum": 1,
        "maximum": 64,
        "description": "run on this many agents at once, one job per node (docs/multinode.md)",
    },
}
RETRY_CAUSES = ("agent-lost", "preempted", "error")
MAX_PORT_COUNT = 64  # `ports: N`: more is a typo for a port number, not a job's need
MAX_RETRIES = 100
COMMON_SCHEMA: dict[str, Any] = {
    "name": _STR,
    "help": _STR,
    "provider": _STR,
    "depends-on": {
        "oneOf": [
            {
                **_STR_LIST,
                "description": "WORKFLOW (runs it first), WORKFLOW:TAG or :TAG (a tagged run of this repository);"
                " OWNER/REPO/WORKFLOW[:TAG] uses another repository's tagged or last done run",
            },
            {
                "type": "object",
                "properties": {
                    "workflows": {**_STR_LIST, "description": "as the list form"},
                    "repo": {
                        "type": "object",
                        "properties": {
                            "include": {
                                **_STR_LIST,
                                "description": "project files the job needs (checked to be in the code sent)",
                            }
                        },
                        "additionalProperties": False,
                    },
                },
                "additionalProperties": False,
                "description": "April 2022: {repo: {include: [FILES]}, workflows: [WORKFLOWS]}",
            },
        ]
    },
    "deps": {
        "type": "array",
        "items": {
            "oneOf": [
                {
                    **_STR,
                    "description": "WORKFLOW (its last done run), WORKFLOW:TAG, :TAG; OWNER/REPO/WORKFLOW,"
                    " :OWNER/REPO/TAG or OWNER/REPO/:TAG for another repository",
                },
                {
                    "type": "object",
                    "properties": {
                        "tag": {**_STR, "description": "TAG of this repository, or OWNER/REPO/TAG"},
                        "mount": {"type": "boolean", "description": "2022: accepted; the files are the same"},
                    },
                    "required": ["tag"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {
                        "workflow": {
                            **_STR,
                            "description": "the last done run of WORKFLOW in this repository, or OWNER/REPO/WORKFLOW",
                        },
                        "mount": {"type": "boolean", "description": "2022: accepted; the files are the same"},
                    },
                    "required": ["workflow"],
                    "additionalProperties": False,
                },
            ]
        },
    },
    "artifacts": {
        "type": "array",
        "items": {
            "oneOf": [
                _STR,
                {
                    "type": "object",
                    "properties": {"path": _STR, "mount": {"type": "boolean"}},
                    "required": ["path"],
                    "additionalProperties": False,
                },
            ]
        },
    },
    "resources": {"type": "object", "properties": RESOURCE_SCHEMA, "additionalProperties": False},
    "environment": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean", "null"]}},
    "gpu": {
        "type": "integer",
        "minimum": 0,
        "deprecated": True,
        "description": "early 2022, ignored as 2022 dstack ignored it (with a note): resources.gpu asks for GPUs",
    },
    "env": {**_STR_LIST, "description": "K=V, or K to take K from the caller's environment (empty when unset)"},
    "working_dir": _STR,
    "before_run": {**_STR_LIST, "description": "commands run before the provider's own"},
    "image": {**_STR, "description": "container image (container runtimes); the provider picks one if omitted"},
    "retry": {
        "type": "object",
        "properties": {
            "limit": {"type": "integer", "minimum": 0, "maximum": MAX_RETRIES},
            "on": {"type": "array", "items": {"enum": list(RETRY_CAUSES)}},
        },
        "additionalProperties": False,
        "description": "requeue the job as a new attempt when it ends for one of `on` (default: all), `limit` times",
    },
    "max_duration": {
        "type": ["string", "integer"],
        "description": "stop the job when it runs longer: 2h, 30m, 90s, 1h30m, or seconds",
    },
    "ports": {
        "oneOf": [
            {
                "type": "array",
                "items": {"oneOf": [{"type": "integer", "minimum": 1, "maximum": 65535}, {"type": "string"}]},
                "description": "PORT, or HOST_PORT:CONTAINER_PORT",
            },
            {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_PORT_COUNT,
                "description": "N free ports the agent picks when the job starts: $PORT_0 .. $PORT_{N-1} (2022)",
            },
        ]
    },
}
COMMON_FIELDS = set(COMMON_SCHEMA)
RESOURCE_FIELDS = set(RESOURCE_SCHEMA)
GPU_FIELDS = set(GPU_SCHEMA)
MAX_GPUS = 1024
MAX_NODES = 64  # coordinator/gangs.py's limit
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def find_project_root(start: Path) -> Path:
    """The nearest folder at or above `start` that has .dstack/workflows.yaml or .dstack/workflows/."""
    for d in [start, *start.parents]:
        if (d / ".dstack" / "workflows.yaml").is_file() or (d / ".dstack" / "workflows").is_dir():
            return d
    raise CliError(f"no .dstack/workflows.yaml in {start} or above it: run `dstack init` or create one")


def workflow_files(root: Path) -> list[Path]:
    """.dstack/workflows.yaml, then every *.yaml / *.yml under .dstack/workflows/ (sorted)."""
    files = [root / ".dstack" / "workflows.yaml"] if (root / ".dstack" / "workflows.yaml").is_file() else []
    folder = root / ".dstack" / "workflows"
    if folder.is_dir():
        files += sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    return files


def load_workflow_nodes(root: Path, errors: list[WorkflowError] | None = None) -> dict[str, Node]:
    """Every workflow of the project, as written (names checked, fields not yet parsed).

    With `errors` (`dstack validate`), a file or workflow that cannot be read is recorded there and skipped, so
    the others are still checked; without, the first such error is raised (`dstack run`)."""
    out: dict[str, Node] = {}
    for path in workflow_files(root):
        try:
            data = load(path)
            if data is None:
                continue
            if not isinstance(data, Node) or "workflows" not in data:
                raise WorkflowError("expected a top-level 'workflows:' list", getattr(data, "location", None))
            fields.check_unknown(data, {"workflows"}, "the file")
            items = data["workflows"]
            if items is None:
                continue
            if not isinstance(items, Seq):
                raise WorkflowError("'workflows' must be a list", data.at("workflows"))
        except WorkflowError as e:
            if errors is None:
                raise
            errors.append(e if e.location else WorkflowError(str(e), Location(path, 1, 1)))
            continue
        for i, node in enumerate(items):
            try:
                _add_workflow(out, path, node, items.item_locations[i])
            except WorkflowError as e:
                if errors is None:
                    raise
                errors.append(e)
    return out


def _add_workflow(out: dict[str, Node], path: Path, node: object, loc: Location) -> None:
    if not isinstance(node, Node):
        raise WorkflowError("each workflow must be a mapping with name and provider", loc)
    node = early2022.normalize(node)  # the early-2022 syntax, in today's shape
    name = fields.string(node, "name", required=True)
    _no_templates(node, "name")
    _no_templates(node, "depends-on")
    if name in out:
        first = out[name].location
        where = f"line {first.line}" if first.file == path else f"{first.file}:{first.line}"
        raise WorkflowError(f"workflow {name!r} is defined twice (first at {where})", node.at("name"))
    out[name] = node


def load_workflows(root: Path) -> dict[str, Workflow]:
    """Every workflow, parsed and validated (without variables: see cli.commands.run)."""
    return {name: parse_workflow(node) for name, node in load_workflow_nodes(root).items()}


def _no_templates(node: Node, key: str) -> None:
    """Names and dependencies decide the run's shape before variables are known: no `${{ }}` there."""
    if any("${{" in t for t in strings_in(node.get(key))):
        raise WorkflowError(f"'{key}' cannot use ${{{{ }}}} variables", node.at(key))


def parse_workflow(node: Node) -> Workflow:
    name = fields.string(node, "name", required=True)
    early2022.note(node)
    provider_name, provider = resolve_provider(node)
    if not provider.open_fields:
        fields.check_unknown(node, COMMON_FIELDS | set(provider.fields), f"workflow {name!r}")
    wf = Workflow(
        name=name,
        provider=provider_name,
        node=node,
        location=node.location,
        help=fields.string(node, "help"),
        depends_on=(deps := dependencies(node)).runtime,
        input_tags=deps.tags,
        input_workflows=deps.workflows,
        artifacts=_artifacts(node),
        resources=_resources(node, {"nodes"} if provider.open_fields else set()),
        env=_environment(node),
        working_dir=fields.relative_path(node, "working_dir", fields.string(node, "working_dir", default=".")),
        before_run=fields.string_list(node, "before_run"),
        image=fields.image_ref(node, "image"),
        ports=_ports(node),
        port_count=_port_count(node),
        retry=_retry(node),
        max_duration_s=fields.duration_s(node, "max_duration"),
    )
    if not provider.open_fields:
        _top_level_gpu(node)
    provider.validate(wf)
    return wf


def _top_level_gpu(node: Node) -> None:
    """`gpu: 1` beside the provider's fields (dstack-examples, March 2022): that year's python provider read no
    resources at all (dstackai/dstack 2bde6c2, python.py: `"resources": None`; from 2022-03-15 only `resources:`),
    so the job ran without a GPU. The same here, with a note saying how to ask for one."""
    if "gpu" not in node:
        return
    gpu = node["gpu"]
    if isinstance(gpu, bool) or not isinstance(gpu, int) or gpu < 0:
        raise WorkflowError("'gpu' must be a whole number (and is ignored: write resources.gpu)", node.at("gpu"))
    print(
        f"note: {node.at('gpu')}: a top-level 'gpu' is ignored, as 2022 dstack ignored it: the job gets no GPU;"
        " write `resources: {gpu: N}` to ask for N",
        file=sys.stderr,
    )


def output_paths(root: Path) -> list[str]:
    """Every artifact folder the project's workflows declare, relative to the project root (a workflow
    that cannot be read adds none: `dstack run` reports its errors where they matter)."""
    out: list[str] = []
    try:
        nodes = load_workflow_nodes(root)
    except WorkflowError:
        return out
    for node in nodes.values():
        base = _literal_working_dir(node)
        try:
            artifacts = _artifacts(node)
        except WorkflowError:
            continue
        for a in artifacts:
            if "${{" in a.path or is_container_path(a.path):  # absolute: inside the container, not here
                continue
            with contextlib.suppress(ValueError):  # a working_dir out of the code: `dstack run` refuses it
                out.append(in_code(base, a.path))
    return sorted(set(out))


def _literal_working_dir(node: Node) -> str:
    """The workflow's working_dir as written ("." when absent or still holding a variable)."""
    working_dir = node.get("working_dir")
    return working_dir if isinstance(working_dir, str) and "${{" not in working_dir else "."


def artifact_paths(root: Path, workflow: str) -> list[str]:
    """The artifact paths the project's workflow declares; none for a workflow that is not here."""
    node = load_workflow_nodes(root).get(workflow)
    if node is None:
        return []
    return [a.path for a in _artifacts(node) if "${{" not in a.path]


def container_artifact(node: Node) -> tuple[str, Location] | None:
    """The workflow's first absolute artifact path (a folder inside its container) and its line, if any."""
    items = node.get("artifacts")
    if not isinstance(items, Seq):
        return None
    for i, item in enumerate(items):
        path, loc = item, items.item_locations[i]
        if isinstance(item, Node):
            path, loc = item.get("path"), item.at("path")
        if isinstance(path, str) and is_container_path(path):
            try:
                return check_container_path(path), loc
            except BadContainerPath:
                return path, loc
    return None


def _artifacts(node: Node) -> list[Artifact]:
    """`artifacts: [model, {path: logs, mount: true}]`: paths relative to the working directory, or absolute
    (`/opt/conda/envs/myenv`, as 2022 examples wrote them): a folder inside the job's container, saved and
    mounted at the same path in dependants (protos/container_paths.py; the job needs a container runtime)."""
    items = node.get("artifacts")
    if items is None:
        return []
    if not isinstance(items, Seq):
        raise WorkflowError("'artifacts' must be a list of paths or {path, mount}", node.at("artifacts"))
    out = []
    working_dir = _literal_working_dir(node)  # relative paths are under it (protos/artifact_paths.py)
    in_container: list[str] = []  # the absolute paths so far: none may overlap another
    for i, item in enumerate(items):
        loc = items.item_locations[i]
        if isinstance(item, Node):
            fields.check_unknown(item, {"path", "mount"}, "an artifact")
            mount = item.get("mount", False)
            if not isinstance(mount, bool):
                raise WorkflowError("'mount' must be true or false", item.at("mount"))
            path = fields.string(item, "path", required=True)
            out.append(Artifact(_relative(path, item.at("path"), working_dir), mount))
        elif isinstance(item, (str, int, float)) and not isinstance(item, bool):
            out.append(Artifact(_relative(str(item), loc, working_dir)))
        else:
            raise WorkflowError("each artifact must be a path or {path, mount}", loc)
        path = out[-1].path
        if is_container_path(path) and "${{" not in path:
            try:
                check_disjoint([*in_container, path])
            except BadContainerPath as e:
                raise WorkflowError(str(e), loc) from None
            in_container.append(path)
    return out


def _relative(path: str, loc: Location, working_dir: str = ".") -> str:
    if is_container_path(path):
        if "${{" in path:  # checked once the variables are substituted (`dstack run` does it first)
            return path
        try:
            return check_container_path(path)
        except BadContainerPath as e:
            raise WorkflowError(str(e), loc) from None
    norm = posixpath.normpath(path)
    if not path or path.startswith("/") or norm == ".." or norm.startswith("../"):
        raise WorkflowError(f"artifacts path {path!r} must be relative and stay inside the working directory", loc)
    root = _project_root(loc.file)
    try:
        where = in_code(working_dir, norm)  # where the job saves it: under its working_dir
    except ValueError:
        where = norm  # a working_dir out of the code: refused at its own line
    if root is not None:
        try:
            target = (root / where).resolve()  # follows links anywhere on the path, not only the last part
        except (OSError, RuntimeError) as e:  # a symlink loop
            raise WorkflowError(f"artifacts path {path!r} cannot be resolved: {e}", loc) from None
        if not target.is_relative_to(root.resolve()):
            raise WorkflowError(
                f"artifacts path {path!r} leads through a symlink to {target}, outside the working directory", loc
            )
    return norm


def _project_root(workflow_file: Path) -> Path | None:
    """The folder holding .dstack/ for a workflow file in .dstack/ or .dstack/workflows/."""
    for parent in workflow_file.parents:
        if parent.name == ".dstack":
            return parent.parent
    return None


_PORTS_FORMS = f"a number of ports to pick (0-{MAX_PORT_COUNT}) or a list of PORT or HOST:CONTAINER"


def _port_count(node: Node) -> int:
    """`ports: N` (2022): N free ports the agent picks at start, as $PORT_0..$PORT_{N-1}; 0 for the list form.

    A string of digits counts too: that is what `ports: ${{ n }}` becomes once variables are substituted."""
    value = node.get("ports")
    if value is None or isinstance(value, Seq):
        return 0
    if isinstance(value, str) and value.isascii() and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise WorkflowError(f"'ports' must be {_PORTS_FORMS}, got {value!r}", node.at("ports"))
    if value < 0:
        raise WorkflowError(f"'ports' must be {_PORTS_FORMS}, got {value}", node.at("ports"))
    if value > MAX_PORT_COUNT:
        raise WorkflowError(
            f"'ports: {value}' asks for {value} ports: give a number from 0 to {MAX_PORT_COUNT},"
            " or a list such as [8080] for that port itself",
            node.at("ports"),
        )
    return value


def _ports(node: Node) -> list[tuple[int, int]]:
    """`ports: [8888, "8080:80"]` -> (host, container) pairs, each in 1..65535 (`ports: N`: _port_count)."""
    items = node.get("ports")
    if items is None or not isinstance(items, Seq):
        return []
    out = []
    for i, item in enumerate(items):
        loc = items.item_locations[i]
        raw = items.item_raw[i]
        text = raw if raw is not None else str(item)  # `22:22` unquoted is a YAML 1.1 base-60 number
        parts = text.split(":")
        if isinstance(item, bool) or len(parts) > 2 or not all(p.isascii() and p.isdigit() for p in parts):
            raise WorkflowError(f"port {text!r} is not PORT or HOST:CONTAINER", loc)
        numbers = [int(p) for p in parts]
        if not all(1 <= n <= 65535 for n in numbers):
            raise WorkflowError(f"port {text!r} is out of range (1-65535)", loc)
        out.append((numbers[0], numbers[-1]))
    return out


def _environment(node: Node) -> dict[str, str]:
    """`environment: {K: V}`, and the later syntax `env: [K=V, K]` (a bare K is taken from the caller, else empty)."""
    out: dict[str, str] = {}
    env = node.get("environment")
    if env is not None:
        if not isinstance(env, Node):
            raise WorkflowError("'environment' must be a mapping of NAME: value", node.at("environment"))
        out.update({str(k): fields.scalar_text(env, k) for k in env})
    items = node.get("env")
    if isinstance(items, Node):  # a mapping under `env:` works too
        out.update({str(k): fields.scalar_text(items, k) for k in items})
    elif items is not None:
        for i, item in enumerate(fields.string_list(node, "env")):
            name, eq, value = item.partition("=")
            loc = items.item_locations[i] if isinstance(items, Seq) else node.at("env")
            if not _ENV_NAME.fullmatch(name):
                raise WorkflowError(f"invalid environment variable name {name!r} in 'env'", loc)
            if not eq:
                value = os.environ.get(name, "")
                if name not in os.environ:
                    # 2022 dstack gave a bare NAME the value "" always (it never read the caller's); issue 13 asks
                    # for the caller's value when set: a note, not an error, when it is not.
                    print(
                        f"note: {loc}: 'env' takes {name} from your environment, but it is not set there:"
                        " the job gets it empty (2022 dstack always set a bare name to empty)",
                        file=sys.stderr,
                    )
            out[name] = value
    return out


def _retry(node: Node) -> common_pb2.RetryPolicy | None:
    """`retry: {limit: 3, on: [agent-lost, preempted, error]}`; `on` defaults to all three."""
    if "retry" not in node:
        return None
    r = node.get("retry")
    if not isinstance(r, Node):
        raise WorkflowError("'retry' must be a mapping like {limit: 3, on: [agent-lost, error]}", node.at("retry"))
    fields.check_unknown(r, {"limit", "on"}, "retry")
    if "limit" not in r:
        raise WorkflowError("'retry' needs a 'limit' (how many new attempts at most)", node.at("retry"))
    limit = fields.whole_number(r, "limit", 0, MAX_RETRIES)
    on = fields.string_list(r, "on", split=True) if "on" in r else list(RETRY_CAUSES)
    for i, cause in enumerate(on):
        if cause not in RETRY_CAUSES:
            items = r.get("on")
            loc = items.item_locations[i] if isinstance(items, Seq) else r.at("on")
            raise WorkflowError(f"retry on {cause!r}: must be one of {', '.join(RETRY_CAUSES)}", loc)
    return common_pb2.RetryPolicy(limit=limit, on=list(dict.fromkeys(on)))


def _resources(node: Node, own_fields: set[str]) -> common_pb2.Resources:
    """`own_fields`: the provider's own resource fields (2022 custom providers' `nodes`), passed on as data."""
    r = node.get("resources")
    if r is None:
        return common_pb2.Resources()
    if not isinstance(r, Node):
        raise WorkflowError("'resources' must be a mapping (gpu, cpu, memory...)", node.at("resources"))
    fields.check_unknown(r, RESOURCE_FIELDS | own_fields, "resources")
    out = common_pb2.Resources(
        cpu=fields.number(r, "cpu"),
        memory_bytes=fields.size_bytes(r, "memory"),
        shm_size_bytes=fields.size_bytes(r, "shm_size"),
    )
    interruptible = r.get("interruptible", False)
    if not isinstance(interruptible, bool):
        raise WorkflowError("'interruptible' must be true or false", r.at("interruptible"))
    out.interruptible = interruptible
    for key in ("local", "remote"):
        if key in r:
            if not isinstance(r[key], bool):
                raise WorkflowError(f"'{key}' must be true or false", r.at(key))
            print(
                f"note: {r.at(key)}: resources.{key} (2022: where the run goes) is ignored: runs go to the"
                " coordinator dstack is set up for (`dstack local` runs them on this machine)",
                file=sys.stderr,
            )
    if "nodes" in r and "nodes" not in own_fields:  # a custom provider's `nodes` is its own data
        out.nodes = fields.whole_number(r, "nodes", 1, MAX_NODES)
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
