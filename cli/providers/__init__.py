"""Provider plugins: a provider turns one workflow into job specs.

Providers are found through the `dstack.providers` entry-point group, so a package can add its own:

    [project.entry-points."dstack.providers"]
    mytool = "mypkg.provider:MyToolProvider"
"""

from __future__ import annotations

from importlib.metadata import entry_points

from cli.errors import WorkflowError
from cli.providers.base import Provider
from cli.yamlsrc import Node

GROUP = "dstack.providers"


def known_providers() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=GROUP))


def load_provider(name: str, node: Node | None = None) -> Provider:
    for ep in entry_points(group=GROUP, name=name):
        cls = ep.load()
        provider = cls()
        if not isinstance(provider, Provider):
            raise WorkflowError(f"provider {name!r} ({ep.value}) does not implement the Provider interface")
        return provider
    known = ", ".join(known_providers()) or "none installed"
    raise WorkflowError(
        f"unknown provider {name!r}; known providers: {known}",
        node.at("provider") if node is not None else None,
    )


__all__ = ["Provider", "known_providers", "load_provider"]
