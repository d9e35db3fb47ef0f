"""Provider plugins: a provider turns one workflow into job specs.

Providers are found through the `dstack.providers` entry-point group, so a package can add its own:

    [project.entry-points."dstack.providers"]
    mytool = "mypkg.provider:MyToolProvider"
"""

from __future__ import annotations

from importlib.metadata import entry_points

from dstack.cli.errors import WorkflowError
from dstack.cli.providers.base import Provider
from dstack.cli.yamlsrc import Node

GROUP = "dstack.providers"


def _builtin() -> dict[str, type[Provider]]:
    # Also registered as entry points; listed here so a source checkout without installed metadata works.
    from dstack.cli.providers.bash import BashProvider
    from dstack.cli.providers.curl import CurlProvider
    from dstack.cli.providers.docker import DockerProvider
    from dstack.cli.providers.python import PythonProvider

    return {"bash": BashProvider, "curl": CurlProvider, "docker": DockerProvider, "python": PythonProvider}


def known_providers() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=GROUP)} | set(_builtin()))


def load_provider(name: str, node: Node | None = None) -> Provider:
    for ep in entry_points(group=GROUP, name=name):
        provider = ep.load()()
        if not isinstance(provider, Provider):
            raise WorkflowError(f"provider {name!r} ({ep.value}) does not implement the Provider interface")
        return provider
    builtin = _builtin().get(name)
    if builtin is not None:
        return builtin()
    known = ", ".join(known_providers()) or "none installed"
    raise WorkflowError(
        f"unknown provider {name!r}; known providers: {known}",
        node.at("provider") if node is not None else None,
    )


__all__ = ["Provider", "known_providers", "load_provider"]
