"""`dstack run WORKFLOW`: validate, pack the code, submit, follow the logs."""

from __future__ import annotations

import json
import posixpath
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dstack.cli.client import Client
from dstack.cli.commands.logs import print_logs
from dstack.cli.errors import CliError, Location, NotFoundError, RequestRejected, WorkflowError
from dstack.cli.packing import PackedCode
from dstack.cli.providers import load_provider, resolve_provider
from dstack.cli.render import run_summary
from dstack.cli.spec import Workflow
from dstack.cli.term import Term
from dstack.cli.yamlsrc import Node
from dstack.protos.v1 import client_pb2, common_pb2

if TYPE_CHECKING:
    from dstack.cli.providers.custom import RepoRef

LARGE_CODE = 50 << 20
STOP_WAIT_S = 60.0


class Notes(Protocol):
    """Where warnings about the code sent go: the CLI's stderr (cli/term.py), or the SDK's logger."""

    def print(self, *parts: str | tuple[str, str]) -> None: ...


def _workflow_node(root: Path, workflow_name: str, nodes: dict[str, Node] | None = None) -> Node:
    from dstack.cli.workflows import load_workflow_nodes

    nodes = load_workflow_nodes(root) if nodes is None else nodes
    node = nodes.get(workflow_name)
    if node is None:
        known = ", ".join(sorted(nodes)) or "none"
        raise NotFoundError(
            f"workflow {workflow_name!r} is not defined in {root / '.dstack' / 'workflows.yaml'}; workflows: {known}"
        )
    return node


def no_workflow_error(cwd: Path) -> WorkflowError:
    """`dstack run` alone: its usage, and the workflows there are to run, with their help."""
    from dstack.cli.workflows import find_project_root, load_workflow_nodes

    usage = "missing the workflow to run. Usage: dstack run WORKFLOW [ARGS]..."
    try:
        root = find_project_root(cwd)
    except CliError as e:
        return WorkflowError(f"{usage}\n{e}")
    nodes = load_workflow_nodes(root)
    if not nodes:
        return WorkflowError(f"{usage}\nno workflows in {root / '.dstack'}; `dstack init` writes an example")
    width = max(len(n) for n in nodes)
    lines = [f"  {name.ljust(width)}  {node.get('help') or ''}".rstrip() for name, node in sorted(nodes.items())]
    return WorkflowError(f"{usage}, one of:\n" + "\n".join(lines))


@dataclass
class Request:
    submit: client_pb2.SubmitRunRequest
    # (tag, the workflow its run must be of, or "" for any; where it is written), for errors at that line
    tag_checks: list[tuple[str, str, Location]]
    # Files the workflows name (a script, a requirements file), relative to the code root, and where: each must
    # be in the packed code, unless the job gets artifacts from dependencies, which may bring it.
    code_files: list[CodeFile]
    # (WORKFLOW or OWNER/REPO/WORKFLOW whose last done run the jobs take, where it is written): the coordinator
    # resolves them at submission; an error it gives about one is shown at that line
    workflow_refs: list[tuple[str, Location]] = field(default_factory=list)
    # Jobs that need a container runtime for an absolute artifact path (their own or a dependency's), and
    # where that path is written: local mode without Docker refuses them before submitting.
    container_needs: list[ContainerNeed] = field(default_factory=list)
    # Custom providers from a repository: their pinned commits, whose files are packed with the code.
    provider_repos: list[RepoRef] = field(default_factory=list)


@dataclass(frozen=True)
class ContainerNeed:
    job_name: str
    why: str
    location: Location


@dataclass(frozen=True)
class CodeFile:
    path: str
    field: str
    location: Location
    may_come_from_inputs: bool
    may_be_folder: bool = False  # `depends-on.repo.include` may name a folder


RECORD_WORKFLOW_LIMIT = 256 * 1024


def build_request(root: Path, workflow_name: str, args: list[str], nodes: dict[str, Node] | None = None) -> Request:
    """Workflow + variables (with `--name value` overrides) -> job specs; every error before anything starts.

    Runtime dependencies (`depends-on: [download]`) join the run as jobs of their own, each run once,
    in dependency order; the coordinator starts a job when those it depends on are done. `nodes`: the project's
    workflows as loaded (fresh: variables are substituted into them in place), else loaded here."""
    from dstack.cli.early2022 import expand_commands
    from dstack.cli.providers.custom import CustomProvider
    from dstack.cli.variables import check_run_args, load_variables, run_args_text, split_overrides, substitute
    from dstack.cli.workflows import dependencies, load_workflow_nodes, parse_workflow

    nodes = load_workflow_nodes(root) if nodes is None else nodes
    target = _workflow_node(root, workflow_name, nodes)  # a clear error for an unknown name
    order = _dependency_order(nodes, workflow_name, _runtime_dependencies)
    variables = {name: load_variables(root, name) for name in order}
    known = set().union(*(v.defaults for v in variables.values()))
    provider_name = target.get("provider")
    # 2022's bash provider read `-p/--ports N` among the run's arguments (`dstack run app -p 2`).
    port_count, workflow_args = take_ports_option(args) if provider_name == "bash" else (None, args)
    overrides, rest = split_overrides(workflow_args, known)
    takes_args = _mentions(target, "run.args") or (
        isinstance(provider_name, str) and load_provider(provider_name, target).passes_run_args
    )
    check_run_args(workflow_args, rest, known, workflow_name, takes_args)
    jobs = []
    tag_checks: list[tuple[str, str, Location]] = []
    workflow_refs: list[tuple[str, Location]] = []
    code_files: list[CodeFile] = []
    provider_repos: list[RepoRef] = []
    container_needs: list[ContainerNeed] = []
    saved_in_container: dict[str, tuple[str, Location]] = {}  # workflow -> (an absolute artifact, its line)
    resolved: dict[str, object] = {}
    for name in order:
        vs = variables[name]
        vs.values.update({k: v for k, v in overrides.items() if k in vs.defaults})
        run_args = rest if name == workflow_name else []
        node = nodes[name]
        substitute(node, _lookup(vs.values, run_args_text(run_args)))
        expand_commands(node, vs.values, vs.own)  # `$model`, `$run_name`... of the early-2022 syntax
        # As it is now (variables, overrides and `${{ }}` resolved): what the run's record keeps.
        resolved[name] = {"workflow": node, "variables": dict(vs.values), "run_args": list(run_args)}
        wf = parse_workflow(node)
        wf.env = vs.env() | wf.env  # what the workflow sets explicitly wins
        if name == workflow_name and port_count is not None:
            wf.ports, wf.port_count = [], port_count  # in place of the workflow's `ports`, as in 2022
        wf.run_args = run_args
        deps = dependencies(node)
        for tag in wf.input_tags:
            tag_checks.append((tag, deps.tag_workflows.get(tag, ""), deps.at("tag", tag, node.location)))
        workflow_refs += [(w, deps.at("workflow", w, node.location)) for w in wf.input_workflows]
        _, provider = resolve_provider(wf.node)
        if isinstance(provider, CustomProvider) and provider.repo and provider.repo not in provider_repos:
            provider_repos.append(provider.repo)
        has_inputs = bool(wf.depends_on or wf.input_tags or wf.input_workflows)
        for key in provider.code_file_fields:
            value = provider.code_file(wf, key)
            if value:
                path = posixpath.normpath(posixpath.join(wf.working_dir or ".", value))
                code_files.append(CodeFile(path, key, wf.node.at(key), has_inputs))
        # Files of the repository itself (2022's `repo.include`): a dependency's artifacts do not stand in for them.
        code_files += [
            CodeFile(p, "depends-on.repo.include", loc, False, may_be_folder=True) for p, loc in deps.include
        ]
        specs = provider.job_specs(wf)
        for spec in specs:
            spec.cache = wf.cache
        jobs += specs
        container_needs += _container_needs(wf, nodes, saved_in_container)
    submit = client_pb2.SubmitRunRequest(workflow=workflow_name, jobs=jobs, args=args)
    text = json.dumps(resolved, sort_keys=True, default=str)
    # The coordinator keeps at most 256 KiB of it (coordinator/records.py): a larger one is said, not sent.
    submit.resolved_workflow = text if len(text) <= RECORD_WORKFLOW_LIMIT else json.dumps({"omitted_bytes": len(text)})
    return Request(
        submit,
        tag_checks,
        code_files,
        provider_repos=provider_repos,
        workflow_refs=workflow_refs,
        container_needs=container_needs,
    )


def _container_needs(
    wf: Workflow, nodes: dict[str, Node], saved: dict[str, tuple[str, Location]]
) -> list[ContainerNeed]:
    """Why the workflow's job needs a container runtime for an absolute artifact path: it saves one, or a
    workflow of this file it depends on (in the run, or its last done run) does. A tag's run is not known
    here: the coordinator marks such a job (it then waits for, or in local mode fails without, Docker)."""
    from dstack.cli.workflows import container_artifact, dependencies

    deps = dependencies(wf.node)
    own = container_artifact(wf.node)
    if own is not None:
        saved[wf.name] = own
    out = []
    if own is not None:
        out.append(ContainerNeed(wf.name, f"workflow {wf.name!r} saves {own[0]}", own[1]))
    for dep in [*wf.depends_on, *wf.input_workflows]:
        found = saved.get(dep) or (container_artifact(nodes[dep]) if dep in nodes else None)
        if found is not None:
            loc = deps.at("runtime" if dep in wf.depends_on else "workflow", dep, wf.node.location)
            out.append(ContainerNeed(wf.name, f"workflow {wf.name!r} mounts {found[0]}, saved by {dep!r}", loc))
    return out


def check_container_runtime(client: Client, request: Request) -> None:
    """Local mode: a job with an absolute artifact path fails at once, before anything is sent, when the
    local agent runs host processes (no Docker engine answered when it started): it could never run there."""
    if not request.container_needs or not client.endpoint.local:
        return
    from dstack.cli.local import LOCAL_AGENT

    runtimes = {a.inventory.runtime for a in client.list_agents() if a.name == LOCAL_AGENT and a.status == "online"}
    if "docker" in runtimes:
        return
    need = request.container_needs[0]
    runtime = "host processes" if runtimes <= {"host"} else f"the {'/'.join(sorted(runtimes))} runtime"
    raise WorkflowError(
        f"{need.why}, an absolute artifact path: a folder inside the job's container, so it needs a container"
        f" runtime, and the local agent runs {runtime}, not containers. Start Docker (the local agent uses it"
        " when it answers, or set DSTACK_RUNTIME=docker) and restart the local services (`dstack local stop`;"
        " the next command starts them), or use a path relative to the working directory",
        need.location,
    )


def take_ports_option(args: list[str]) -> tuple[int | None, list[str]]:
    """`-p N`, `--ports N` or `--ports=N` before `--`: the number of ports to pick (`ports: N`), and the
    other arguments; None when not given."""
    from dstack.cli.workflows import MAX_PORT_COUNT

    end = args.index("--") if "--" in args else len(args)
    count: int | None = None
    rest: list[str] = []
    i = 0
    while i < end:
        arg = args[i]
        name, eq, value = arg.partition("=")
        if arg in ("-p", "--ports") or (eq and name == "--ports"):
            if not eq:
                if i + 1 >= end:
                    raise WorkflowError(f"{arg} needs a number of ports (e.g. {arg} 2)")
                value = args[i + 1]
                i += 1
            if not (value.isascii() and value.isdigit()) or int(value) > MAX_PORT_COUNT:
                raise WorkflowError(f"{name}: give a number of ports from 0 to {MAX_PORT_COUNT}, not {value!r}")
            count = int(value)
        else:
            rest.append(arg)
        i += 1
    return count, rest + args[end:]


def _mentions(value: object, text: str) -> bool:
    """Whether any string in a workflow (before substitution) contains `text`."""
    if isinstance(value, str):
        return text in value
    if isinstance(value, dict):
        return any(_mentions(v, text) for v in value.values())
    if isinstance(value, list):
        return any(_mentions(v, text) for v in value)
    return False


def check_code_files(request: Request, packed: PackedCode, root: Path, err: Notes) -> None:
    """A file the workflow names that is not in the code sent is an error at its line, before anything starts."""
    names = set(packed.names)
    for f in request.code_files:
        if f.path in names or (f.may_be_folder and _is_folder_of(f.path, names)):
            continue
        on_disk = (root / f.path).exists()
        why = (
            "it exists but is not sent with the code (ignored by git, or an artifact folder: `git add` it)"
            if on_disk
            else "there is no such file in the project"
        )
        if f.may_come_from_inputs:  # a dependency's artifacts may bring it
            err.print((f"warning: {f.location}: {f.field} {f.path!r}: {why}", "yellow"))
            continue
        raise WorkflowError(f"{f.field} {f.path!r}: {why}", f.location)


def check_offline(
    root: Path,
    workflow: str,
    args: list[str],
    err: Notes,
    packed: PackedCode | None = None,
    nodes: dict[str, Node] | None = None,
) -> tuple[Request, PackedCode]:
    """Everything `dstack run` checks before it contacts the coordinator (`dstack validate` runs the same):
    the workflow with its variables and dependencies as job specs, and the files it names in the code it sends.
    `packed`: the code, when the caller packed it already (validate, once for every workflow)."""
    built = build_request(root, workflow, args, nodes)
    packed = pack_code(root, built.provider_repos) if packed is None else packed
    check_code_files(built, packed, root, err)
    return built, packed


def check_tags(client: Client, request: Request) -> None:
    """A tag dependency that does not exist is an error at the line that names it, before anything starts:
    the coordinator resolves each as the submission will (in the run's repository, or the one an
    OWNER/REPO/TAG names) and says which repository it searched."""
    for tag, expected, loc in request.tag_checks:
        try:
            found = client.get_tag(tag, request.submit.repository)
        except (NotFoundError, RequestRejected) as e:
            hint = "; `dstack tags add` or `dstack run -t`" if isinstance(e, NotFoundError) else ""
            raise WorkflowError(f"{e}{hint}", loc) from None
        if expected and found.workflow != expected:
            raise WorkflowError(
                f"tag {tag!r} is on run {found.run_name} of workflow {found.workflow!r}"
                f" (repository {found.repository}), not of {expected!r}",
                loc,
            )


def _lookup(values: dict[str, str], run_args: str) -> Callable[[str], str | None]:
    return lambda ref: run_args if ref == "run.args" else values.get(ref)


def _runtime_dependencies(node: Node) -> list[tuple[str, Location]]:
    """The workflows of this project that `node` runs first, each with where it is written."""
    from dstack.cli.workflows import dependencies

    deps = dependencies(node)
    return [(name, deps.at("runtime", name, node.location)) for name in deps.runtime]


def _dependency_order(
    nodes: dict[str, Node], target: str, deps_of: Callable[[Node], list[tuple[str, Location]]]
) -> list[str]:
    """The target's runtime dependencies, transitively, each once, dependencies first."""
    order: list[str] = []
    state: dict[str, str] = {}  # name -> "visiting" | "done"

    def visit(name: str, path: list[str], where: Location | None) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join([*path[path.index(name) :], name])
            raise WorkflowError(f"dependency cycle: {cycle}", where)
        node = nodes.get(name)
        if node is None:
            known = ", ".join(sorted(nodes))
            raise WorkflowError(f"depends-on names {name!r}, which is not a workflow; workflows: {known}", where)
        state[name] = "visiting"
        for dep, loc in deps_of(node):
            visit(dep, [*path, name], loc)
        state[name] = "done"
        order.append(name)

    visit(target, [], None)
    return order


def _is_folder_of(path: str, names: set[str]) -> bool:
    prefix = path.rstrip("/") + "/"
    return path in (".", "") or any(n.startswith(prefix) for n in names)


def located(error: CliError, request: Request) -> CliError:
    """A refusal of the submission about a workflow dependency (`deps: [download]`: no done run yet; an unknown
    OWNER/REPO), at the line that names it: the reference whose workflow and qualifier the message names, else the
    first whose workflow it names, else the first whose qualifier it names."""
    from dstack.protos.repos import split_ref

    text = str(error)
    lowered = text.lower()
    refs = [(split_ref(ref), loc) for ref, loc in request.workflow_refs]
    names = sorted(((r, loc) for r, loc in refs if f"workflow {r.name!r}" in text), key=lambda x: bool(x[0].repository))
    qualified = [(r, loc) for r, loc in refs if r.repository and repr(r.repository).lower() in lowered]
    both = [(r, loc) for r, loc in names if r.repository and r.repository.lower() in lowered]
    for candidates in (both, names, qualified):
        if candidates:
            return WorkflowError(text, candidates[0][1])
    return error


def workflow_help(root: Path, workflow_name: str) -> str:
    """`dstack run WORKFLOW --help`: the workflow's help and its variables with their defaults."""
    from dstack.cli.variables import env_name, load_variables

    node = _workflow_node(root, workflow_name)
    variables = load_variables(root, workflow_name)
    lines = [f"Usage: dstack run {workflow_name} [--VARIABLE VALUE ...] [ARGS ...]", ""]
    if node.get("help"):
        lines += [f"  {node['help']}", ""]
    if variables.defaults:
        lines.append("Variables (override with --NAME VALUE; the job sees them as environment variables):")
        width = max(len(n) for n in variables.defaults)
        for name, value in variables.defaults.items():
            lines.append(f"  --{name.ljust(width)}  default: {value!s:<12} env: {env_name(name)}")
    else:
        lines.append("No variables (define them in .dstack/variables.yaml).")
    return "\n".join(lines)


def list_code(root: Path) -> PackedCode:
    """The files `pack_code` would send, without reading or compressing them (`dstack validate` checks that the
    files workflows name are among them); `data` is empty."""
    from dstack.cli.home import dstack_home
    from dstack.cli.packing import select_files
    from dstack.cli.workflows import output_paths

    names, left_out, credentials, ref = select_files(root, exclude=(dstack_home(),), outputs=output_paths(root))
    return PackedCode(data=b"", ref=ref, names=names, left_out=left_out, credentials_left_out=credentials)


def pack_code(root: Path, provider_repos: list[RepoRef] | None = None) -> PackedCode:
    from dstack.cli.home import dstack_home
    from dstack.cli.packing import pack
    from dstack.cli.providers.custom import archive
    from dstack.cli.workflows import output_paths

    trees = {repo.folder: archive(repo) for repo in provider_repos or []}
    # Never dstack's own state; nor artifact folders (downloaded outputs), unless git tracks them.
    return pack(root, exclude=(dstack_home(),), outputs=output_paths(root), extra_trees=trees)


def upload_code(client: Client, packed: PackedCode, err: Notes) -> common_pb2.CodeRef:
    from dstack.cli.render import plural

    if packed.left_out:
        shown = ", ".join(f"{p}/" for p in packed.left_out[:5]) + (", ..." if len(packed.left_out) > 5 else "")
        err.print((f"code: left out artifact folders {shown} (`git add` what should be sent)", "dim"))
    if packed.credentials_left_out:
        names = packed.credentials_left_out
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        err.print(
            (
                f"code: left out {shown}: untracked files that look like credentials are not sent (pass tokens"
                " with `dstack secrets add`; `git add` a file to send it anyway)",
                "yellow",
            )
        )
    if packed.ref.size > LARGE_CODE:
        err.print(
            (
                f"warning: the code is {packed.ref.size / (1 << 20):.0f} MiB packed; keep data out of the"
                " working tree (use .gitignore, and artifacts for data)",
                "yellow",
            )
        )
    if _upload_blob(client, packed.ref.hash, packed.data):
        err.print((f"code: {plural(packed.files, 'file')}, {packed.ref.size / 1024:.0f} KiB uploaded", "dim"))
    if packed.diff:  # the uncommitted change, kept apart for the run's record (`dstack code RUN --diff`)
        _upload_blob(client, packed.ref.diff_hash, packed.diff)
    return packed.ref


def _upload_blob(client: Client, blob_hash: str, data: bytes) -> bool:
    """Uploads a content-addressed code blob the coordinator lacks; False when it has it already."""
    answer = client.has_code(blob_hash)
    if answer.present:
        return False
    if answer.upload_url:  # straight to the object store; the coordinator checks it at submit
        from dstack.cli.transfers import put_bytes

        put_bytes(answer.upload_url, data)
    else:
        client.put_code(blob_hash, data)
    return True


def submit_built(
    client: Client, built: Request, packed: PackedCode, err: Notes, uploaded: set[str] | None = None
) -> client_pb2.Run:
    """The checks only the coordinator can answer, the code's upload, and the submission: `dstack run`'s and
    the SDK's (dstack.api). `uploaded`: code hashes this process has seen the coordinator hold (the SDK
    submits many runs of one tree), which are not asked about again."""
    check_container_runtime(client, built)
    check_tags(client, built)
    if uploaded is not None and packed.ref.hash in uploaded:
        built.submit.code.CopyFrom(packed.ref)
    else:
        built.submit.code.CopyFrom(upload_code(client, packed, err))
        if uploaded is not None:
            uploaded.add(packed.ref.hash)
    try:
        return client.submit(built.submit)
    except (NotFoundError, RequestRejected) as e:
        raise located(e, built) from None


def run_command(
    workflow: str, args: list[str], detach: bool, tag: str = "", priority: int = 0, cache: bool | None = None
) -> int:
    """`cache`: --reuse (True) or --no-cache (False) for every job, in place of the workflows' `cache`."""
    from dstack.cli.repository import repository_of
    from dstack.cli.session import connect
    from dstack.cli.workflows import find_project_root

    err = Term(stderr=True)
    root = find_project_root(Path.cwd())
    if "--help" in args or "-h" in args:
        print(workflow_help(root, workflow))
        return 0
    built, packed = check_offline(root, workflow, args, err)  # every workflow error before anything starts
    request = built.submit
    request.tag_on_done = tag
    request.priority = priority
    if cache is not None:
        for spec in request.jobs:
            spec.cache = cache
    request.repository = repository_of(root, packed.ref.repo_url)
    client = connect()
    run = submit_built(client, built, packed, err)
    err.print((run.name, "bold"), " submitted")
    if detach:
        print(run.name)
        return 0
    from dstack.cli.waiting import WaitReporter

    waiting = WaitReporter(client, run.name, err).start()
    # A workflow with ports: tunnels to them, open while the logs are followed (docs/tunnels.md).
    tunnels = None
    if any(j.ports or j.port_count for j in request.jobs):
        from dstack.cli.commands.tunnels import RunTunnels

        tunnels = RunTunnels(client, run, err, before_output=waiting.stop).start()
    final = None
    try:
        final = print_logs(client, run, follow=True, before_output=waiting.stop)
    except KeyboardInterrupt:
        waiting.stop()
        if tunnels is not None:
            tunnels.close(None)
        return _interrupted(client, run.name, err)
    finally:
        waiting.stop()
    final = final or client.get_run(run.name)
    if tunnels is not None:
        tunnels.close(final)
    for job in final.jobs:  # the step cache's hits (docs/reproducibility.md)
        if job.status == common_pb2.JOB_STATUS_DONE and job.message.startswith("reused from "):
            err.print((f"{job.job_name}: {job.message}", "dim"))
    style = "green" if final.status == common_pb2.RUN_STATUS_DONE else "red"
    err.print((run_summary(final), style))
    return 0 if final.status == common_pb2.RUN_STATUS_DONE else 1


def _interrupted(client: Client, name: str, err: Term) -> int:
    if sys.stdin.isatty():
        try:
            answer = input(f"\nStop the run {name}? [y/N] ").strip().lower()
        except (EOFError, KeyboardInterrupt):
            answer = ""
        if answer in ("y", "yes"):
            from dstack.cli.commands.stop import describe, stop_and_wait

            err.print(describe(*stop_and_wait(client, name, STOP_WAIT_S)))
            return 130
    err.print(f"\ndetached; the run goes on: `dstack logs {name} -f` to follow, `dstack stop {name}` to stop")
    return 130
