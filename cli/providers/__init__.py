"""Provider plugins: a provider turns one workflow into job specs.

Providers are found through the `dstack.providers` entry-point group, so a package can add its own:

    [project.entry-points."dstack.providers"]
    mytool = "mypkg.provider:MyToolProvider"
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from functools import cache
from pathlib import Path

from dstack.cli.errors import Location, WorkflowError
from dstack.cli.providers.base import Provider
from dstack.cli.yamlsrc import Node

GROUP = "dstack.providers"
CACHE_FILE = "entry-points.json"
METADATA = (".dist-info", ".egg-info")


def _builtin() -> dict[str, type[Provider]]:
    # Also registered as entry points; listed here so a source checkout without installed metadata works.
    from dstack.cli.providers.bash import BashProvider
    from dstack.cli.providers.curl import CurlProvider
    from dstack.cli.providers.devenv import CodeProvider, LabProvider, NotebookProvider
    from dstack.cli.providers.docker import DockerProvider
    from dstack.cli.providers.python import PythonProvider
    from dstack.cli.providers.torchrun import TorchrunProvider

    return {
        "bash": BashProvider,
        "code": CodeProvider,
        "curl": CurlProvider,
        "docker": DockerProvider,
        "lab": LabProvider,
        "notebook": NotebookProvider,
        "python": PythonProvider,
        "torchrun": TorchrunProvider,
    }


def _installed_key() -> list[list[object]]:
    """What importlib.metadata's answer depends on: in the import path's order, each distribution's metadata
    folder (*.dist-info, *.egg-info) and when its entry_points.txt was written.

    Installing, upgrading or removing a distribution adds, renames or removes such a folder; reinstalling one
    writes its entry_points.txt anew. Folders on the path without distributions (the project, when run with
    `python -m`) are not part of it, so editing a project does not make the cache miss."""
    key: list[list[object]] = [[sys.executable]]
    for entry in sys.path:
        folder = entry or "."
        try:
            if not os.path.isdir(folder):  # a zip archive, or nothing
                key.append([entry, os.stat(folder).st_mtime_ns])
                continue
            names = sorted(n for n in os.listdir(folder) if n.lower().endswith(METADATA) or n.lower() == "egg-info")
        except OSError:
            continue
        for name in names:
            try:
                mtime: int | None = os.stat(os.path.join(folder, name, "entry_points.txt")).st_mtime_ns
            except OSError:
                mtime = None
            key.append([entry, name, mtime])
    return key


@cache
def entry_points() -> list[tuple[str, str]]:
    """(name, "module:attr") of the installed `dstack.providers` entry points, in importlib.metadata's order.

    Asking importlib.metadata costs ~10 ms to import it and a read of every installed distribution's metadata,
    a tenth of `dstack run`. The answer is kept in $DSTACK_HOME/cache and reused while what is installed on the
    import path is unchanged (see _installed_key); any other case asks again."""
    from dstack.cli.home import dstack_home

    key = _installed_key()
    path = dstack_home() / "cache" / CACHE_FILE
    try:
        cached = json.loads(path.read_text())
        if cached["key"] == key:
            return [(str(name), str(value)) for name, value in cached["entry_points"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    from importlib.metadata import entry_points as installed

    found = [(ep.name, ep.value) for ep in installed(group=GROUP)]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{CACHE_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "entry_points": found}))
        os.replace(tmp, path)  # another CLI reads the old file or the new one, never half of one
    except OSError:
        pass  # not cached: asked again next time
    return found


def _load(value: str) -> object:
    """What an entry point names: "module", "module:attr" or "module:attr.attr" (as EntryPoint.load)."""
    module, _, attrs = value.partition(":")
    obj: object = importlib.import_module(module.strip())
    for attr in attrs.split("[")[0].strip().split("."):  # "[extras]" do not change what is loaded
        if attr:
            obj = getattr(obj, attr)
    return obj


def known_providers() -> list[str]:
    return sorted({name for name, _ in entry_points()} | set(_builtin()))


# Built in a separate issue; until then named clearly rather than refused as unknown (2022 docs listed them).
NOT_AVAILABLE_YET: frozenset[str] = frozenset()  # every 2022 built-in is here now (a NAME@BRANCH is not)


def _project_root(node: Node | None) -> Path | None:
    """The folder holding .dstack/ for the workflow file `node` comes from."""
    if node is None or node.location is None:
        return None
    for parent in Path(node.location.file).parents:
        if parent.name == ".dstack":
            return parent.parent
    return None


# `provider: {name: NAME, repo: .}`: the project's own `.dstack/providers.yaml` entry, even where a built-in
# provider has that name (a bare NAME means the built-in then: see load_provider).
OWN_REPO = frozenset({".", "./"})


def resolve_provider(node: Node) -> tuple[str, Provider]:
    """The workflow's `provider:`: a name, or (2022) `{name: NAME, repo: URL}`; -> (its name, the provider)."""
    from dstack.cli import fields
    from dstack.cli.providers.custom import remote_provider

    value = node.get("provider")
    if isinstance(value, Node):
        fields.check_unknown(value, {"name", "repo"}, "provider")
        name = fields.string(value, "name", required=True)
        repo = fields.string(value, "repo")
        if not repo:  # `{name: python}`: as a bare name
            return name, load_provider(name, node)
        if repo in OWN_REPO:
            return name, _own_provider(name, node, value.at("repo"))
        return name, remote_provider(name, repo, _project_root(node), value.at("repo"))
    name = fields.string(node, "provider", required=True)
    return name, load_provider(name, node)


def _own_provider(name: str, node: Node, where: Location) -> Provider:
    """`{name: NAME, repo: .}`: the entry of the project's own providers.yaml, chosen over a built-in NAME."""
    from dstack.cli.providers.custom import CustomProvider, local_providers

    root = _project_root(node)
    own = local_providers(root)
    entry = own.get(name)
    if entry is None:
        known = ", ".join(sorted(own)) or "none"
        raise WorkflowError(
            f"the project's .dstack/providers.yaml defines no provider {name!r}; it defines: {known}", where
        )
    if _installed_or_builtin(name):
        _note_once(
            f"note: {where}: provider {name!r} is the project's own entry"
            f" ({entry.location or '.dstack/providers.yaml'}), chosen by `repo: .` over the built-in of that name"
        )
    return CustomProvider(entry)


def _installed_or_builtin(name: str) -> bool:
    return name in _builtin() or any(ep_name == name for ep_name, _ in entry_points())


_noted: set[str] = set()  # a note is printed once per CLI process (the run's checks read a workflow more than once)


def _note_once(text: str) -> None:
    if text not in _noted:
        _noted.add(text)
        print(text, file=sys.stderr)


def load_provider(name: str, node: Node | None = None) -> Provider:
    """A bare provider NAME: an installed or built-in provider of that name, else the project's own
    `.dstack/providers.yaml` entry.

    A built-in wins over a project's entry of the same name, as in 2022: the July 2022 CLI ran a bare built-in
    name as the built-in whatever the project's providers.yaml said (dstackai/dstack 5822fc1,
    src/dstack/cli/run.py `parse_run_args`: `is_built_in_provider = provider_name in built_in_provider_names and
    not provider_branch`), and from August 2022 (2dbf9f5) the CLI no longer read a project's providers.yaml at
    all. dstack's own July 2022 providers.yaml defined its built-ins (`python`, `bash`...) by programs in its
    tree: those names mean the built-ins. The shadowed entry is named in a note; `repo: .` chooses it."""
    from dstack.cli.providers.custom import CustomProvider, local_providers

    own = local_providers(_project_root(node)).get(name)
    if own is not None:
        if not _installed_or_builtin(name):
            return CustomProvider(own)
        used = f" ({node.at('provider')})" if node is not None else ""
        _note_once(
            f"note: {own.location or '.dstack/providers.yaml'}: the project's provider {name!r} is shadowed by the"
            f" built-in provider of that name: `provider: {name}`{used} runs the built-in, as 2022 dstack did; to run"
            f" this entry write `provider: {{name: {name}, repo: .}}`"
        )
    for ep_name, value in entry_points():
        if ep_name != name:
            continue
        factory = _load(value)
        provider = factory() if callable(factory) else None
        if not isinstance(provider, Provider):
            raise WorkflowError(f"provider {name!r} ({value}) does not implement the Provider interface")
        return provider
    builtin = _builtin().get(name)
    if builtin is not None:
        return builtin()
    base, at, branch = name.partition("@")
    # `torchrun@experimental` (2022, a branch of a provider's repository): no such built-in.
    if base in NOT_AVAILABLE_YET or (base != name and base in _builtin()):
        where = node.at("provider") if node is not None else None
        raise WorkflowError(f"provider {name!r} is not available yet", where)
    if at:
        # June 2022 dstack read a bare NAME@BRANCH from dstackai/dstack's own providers at that branch (its
        # developers' test builds); a name that is no built-in: say where a branch can come from.
        raise WorkflowError(
            f"provider {name!r}: a branch is read only from a provider repository"
            f" (`provider: {{name: {base}@{branch}, repo: URL}}`)",
            node.at("provider") if node is not None else None,
        )
    known = ", ".join(known_providers()) or "none installed"
    raise WorkflowError(
        f"unknown provider {name!r}; known providers: {known}",
        node.at("provider") if node is not None else None,
    )


__all__ = ["Provider", "known_providers", "load_provider", "resolve_provider"]
