"""Which coordinator a command talks to: the configured one, or the embedded local services."""

from __future__ import annotations

from dstack.cli.client import Client
from dstack.cli.home import load_configured


def connect() -> Client:
    endpoint = load_configured()
    if endpoint is None:
        from dstack.cli import local

        endpoint = local.ensure_running()
    return Client(endpoint)
