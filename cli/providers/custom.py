"""2022 custom providers: `provider: {name: NAME, repo: URL}`, or a bare NAME from the project's own
`.dstack/providers.yaml`.

A 2022 custom provider was not code the CLI ran: `.dstack/providers.yaml` names an `image` and `commands`, and
dstack ran those commands as a job, in that image, from the provider repository's files, with the workflow's
fields as the provider's input. We do the same: the CLI only reads the repository (git clone/fetch into a cache
under $DSTACK_HOME, then `git show` of its providers.yaml; no checkout, no hooks, nothing executed), pins the
commit it read; that commit's files (`git archive`) are packed with the job's code under .dstack-provider/COMMIT/
(so an agent that cannot reach the repository runs it too), and the job runs the provider's commands there. The
workflow's fields reach the provider as JSON in $DSTACK_WORKFLOW_DATA.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dstack.cli.errors import Location, WorkflowError
from dstack.cli.providers.base import Provider
from dstack.cli.spec import Workflow
from dstack.protos.v1 import common_pb2

# Transports git may use for a provider repository: never `ext::` (runs a command) or other helpers.
ALLOWED_PROTOCOLS = "file:git:http:https:ssh"
GIT_TIMEOUT_S = 120


@dataclass(frozen=True)
class ProviderDef:
    name: str
    image: str
    commands: list[str]
    # Where the entry's `name:` is written (the project's own file; a repository's file read by git has none).
    location: Location | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RepoRef:
    url: str  # as given (a git URL, file:// URL or local path made absolute)
    commit: str  # the commit whose providers.yaml was read: the job runs exactly that
    git_dir: Path  # the CLI's cached copy, where that commit's files are archived from

    @property
    def folder(self) -> str:
        """Where the commit's files are in the job's code, relative to the code's root."""
        return f"{PROVIDER_FILES}/{self.commit}"


# The provider's files travel with the code (`git archive` of the pinned commit, packed under this folder), so any
# agent runs it: one that cannot reach the repository (a `file://` path on the user's machine, a private URL needing
# the user's credentials) included, and the job never runs git.
PROVIDER_FILES = ".dstack-provider"


def archive(ref: RepoRef) -> bytes:
    """The pinned commit's tree as a tar archive (no .git, no hooks: only the files git tracks)."""
    env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCATING}
    env |= {"GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"}
    try:
        r = subprocess.run(
            ["git", "-c", "core.hooksPath=/dev/null", "archive", "--format=tar", ref.commit],
            cwd=ref.git_dir,
            capture_output=True,
            env=env,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise WorkflowError(f"cannot read provider repository {ref.url!r} at {ref.commit[:12]}: {e}") from None
    if r.returncode != 0:
        why = _last_line(r.stderr.decode("utf-8", "replace"))
        raise WorkflowError(f"cannot read provider repository {ref.url!r} at {ref.commit[:12]}: {why}")
    return r.stdout


def parse_providers_yaml(text: str, where: str, path: Path | None = None) -> dict[str, ProviderDef]:
    """`providers: [{name, image, commands}]` (all required, as 2022 docs/custom-providers.md).

    `path`: the file on disk (the project's own), so that errors name its line; a repository's file (read with
    `git show`) has none and is named by `where`."""
    from dstack.cli.yamlsrc import Node, load

    try:
        data = load(path) if path is not None else yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise WorkflowError(f"{where}: invalid YAML: {e}") from None

    def fail(message: str, node: object = None, key: str = "") -> WorkflowError:
        if isinstance(node, Node):
            return WorkflowError(message, node.at(key) if key else node.location)
        return WorkflowError(f"{where}: {message}")

    items = data.get("providers") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise fail("expected a top-level 'providers:' list of {name, image, commands}", data, "providers")
    out: dict[str, ProviderDef] = {}
    for item in items:
        if not isinstance(item, dict):
            raise fail("each provider must be a mapping with name, image and commands", data, "providers")
        name, image, commands = item.get("name"), item.get("image"), item.get("commands")
        if not isinstance(name, str) or not name:
            raise fail("a provider has no 'name'", item)
        if not isinstance(image, str) or not image:
            raise fail(f"provider {name!r} has no 'image'", item, "image" if "image" in item else "")
        if isinstance(commands, str):
            commands = [commands]
        if not isinstance(commands, list) or not commands or not all(isinstance(c, str) for c in commands):
            raise fail(f"provider {name!r} needs 'commands', a list of strings", item, "commands")
        where_name = item.at("name") if isinstance(item, Node) else None
        out[name] = ProviderDef(name, image, list(commands), where_name)
    return out


def local_providers(root: Path | None) -> dict[str, ProviderDef]:
    """The project's own `.dstack/providers.yaml` (empty when there is none, or it is empty)."""
    if root is None:
        return {}
    path = root / ".dstack" / "providers.yaml"
    try:
        text = path.read_text()
    except OSError:
        return {}
    if not text.strip():
        return {}
    return parse_providers_yaml(text, ".dstack/providers.yaml", path)


# Variables that would point git at another repository than the one it is asked about.
_GIT_LOCATING = frozenset({"GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_COMMON_DIR"})


def _git(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # The user's global git config stays (a mirror through `url.X.insteadOf`, credentials); the system's does not.
    env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCATING}
    env |= {"GIT_ALLOW_PROTOCOL": ALLOWED_PROTOCOLS, "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1"}
    try:
        return subprocess.run(
            ["git", "-c", "protocol.ext.allow=never", "-c", "core.hooksPath=/dev/null", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            env=env,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError:
        raise WorkflowError("a provider from a repository needs git on this machine; install git") from None
    except subprocess.TimeoutExpired:
        why = f"git did not answer within {GIT_TIMEOUT_S}s"
        return subprocess.CompletedProcess(args, returncode=1, stdout="", stderr=why)


def normalize_repo_url(url: str, base: Path | None) -> str:
    """A local path (absolute or relative to the project) becomes absolute; URLs stay as written."""
    if url.startswith("-"):
        raise WorkflowError(f"provider repository {url!r} is not a git URL")
    if "://" in url or (":" in url and not url.startswith((".", "/"))):  # scp-like user@host:path
        if url.split("::", 1)[0].isalpha() and "::" in url:
            raise WorkflowError(f"provider repository {url!r}: only file, git, http(s) and ssh URLs are allowed")
        return url
    path = Path(url)
    if not path.is_absolute() and base is not None:
        path = base / path
    return str(path.resolve())


def fetch_repo(url: str, branch: str, loc: Location | None) -> tuple[Path, str]:
    """Clones (first time) or fetches the repository into $DSTACK_HOME/cache/providers; -> (git dir, commit)."""
    from dstack.cli.home import dstack_home

    cache = dstack_home() / "cache" / "providers" / hashlib.sha256(url.encode()).hexdigest()[:32]
    if not (cache / "HEAD").exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}")
        r = _git(["clone", "--bare", "--quiet", "--", url, str(tmp)])
        if r.returncode != 0:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
            raise WorkflowError(f"cannot fetch provider repository {url!r}: {_last_line(r.stderr)}", loc)
        try:
            os.replace(tmp, cache)
        except OSError:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)  # another CLI cloned it first
    else:
        r = _git(["fetch", "--quiet", "--prune", "origin", "+refs/heads/*:refs/heads/*"], cwd=cache)
        if r.returncode != 0:
            raise WorkflowError(f"cannot fetch provider repository {url!r}: {_last_line(r.stderr)}", loc)
    rev = f"refs/heads/{branch}" if branch else "HEAD"
    r = _git(["rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=cache)
    if r.returncode != 0:
        what = f"branch {branch!r}" if branch else "a default branch"
        raise WorkflowError(f"provider repository {url!r} has no {what}", loc)
    return cache, r.stdout.strip()


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "git failed"


_resolved: dict[tuple[str, str], CustomProvider] = {}  # one fetch per repository and name in a CLI process


def remote_provider(name: str, url: str, base: Path | None, loc: Location | None) -> CustomProvider:
    """`provider: {name: NAME[@BRANCH], repo: URL}` -> the provider that repository's providers.yaml defines."""
    try:
        full_url = normalize_repo_url(url, base)
    except WorkflowError as e:  # at the `repo:` line (`dstack validate` lists errors by line)
        raise WorkflowError(str(e), loc) from None
    key = (name, full_url)
    if key not in _resolved:
        _resolved[key] = _remote_provider(name, full_url, url, loc)
    return _resolved[key]


def _remote_provider(name: str, full_url: str, url: str, loc: Location | None) -> CustomProvider:
    name, _, branch = name.partition("@")
    git_dir, commit = fetch_repo(full_url, branch, loc)
    r = _git(["show", f"{commit}:.dstack/providers.yaml"], cwd=git_dir)
    if r.returncode != 0:
        raise WorkflowError(f"provider repository {url!r} has no .dstack/providers.yaml (at {commit[:12]})", loc)
    defs = parse_providers_yaml(r.stdout, f"{url}: .dstack/providers.yaml")
    if name not in defs:
        known = ", ".join(sorted(defs)) or "none"
        raise WorkflowError(f"provider repository {url!r} defines no provider {name!r}; it defines: {known}", loc)
    return CustomProvider(defs[name], RepoRef(full_url, commit, git_dir))


class CustomProvider(Provider):
    """Runs a providers.yaml entry's commands in its image, as one job, with the workflow's fields as input."""

    open_fields = True  # a custom provider takes fields of its own (`nodes`...): 2022 validated none in the CLI

    def __init__(self, definition: ProviderDef, repo: RepoRef | None = None) -> None:
        self.definition = definition
        self.repo = repo
        self.name = definition.name

    def commands(self, wf: Workflow) -> list[str]:
        if self.repo is None:  # the project's own provider: its files are the job's code
            return ['export DSTACK_WORKFLOW_DIR="$PWD"', *self.definition.commands]
        # The commit's files came with the code (PROVIDER_FILES); the provider runs from its repository's root, as
        # 2022 ran it, and finds the workflow's folder (where its artifacts are) in $DSTACK_WORKFLOW_DIR. The
        # folder is named relative to the workflow's working_dir, where the job starts.
        folder = posixpath.relpath(self.repo.folder, posixpath.normpath(wf.working_dir or "."))
        enter = [
            'export DSTACK_WORKFLOW_DIR="$PWD"',
            f'export DSTACK_PROVIDER_DIR="$PWD/{folder}"',
            'cd "$DSTACK_PROVIDER_DIR"',
        ]
        return [*enter, *self.definition.commands]

    def image(self, wf: Workflow) -> str:
        return self.definition.image

    def job_specs(self, wf: Workflow) -> list[common_pb2.JobSpec]:
        specs = super().job_specs(wf)
        data = json.dumps(workflow_data(wf), sort_keys=True)
        for spec in specs:
            spec.image = self.definition.image  # the provider's image runs the provider (the workflow's is data)
            spec.env["DSTACK_WORKFLOW_DATA"] = data
            spec.env["DSTACK_PROVIDER_NAME"] = self.definition.name
            if self.repo is not None:
                spec.env["DSTACK_PROVIDER_REPO"] = self.repo.url
                spec.env["DSTACK_PROVIDER_COMMIT"] = self.repo.commit
        return specs


def workflow_data(wf: Workflow) -> dict[str, object]:
    """The workflow's fields as written (after variables), for the provider program (2022 `workflow.data`)."""
    return json.loads(json.dumps(dict(wf.node), default=str))  # type: ignore[no-any-return]
