"""Which coordinator a command talks to: the configured one, or the embedded local services."""

from __future__ import annotations

from cli.client import Client
from cli.home import load_configured


def connect() -> Client:
    endpoint = load_configured()
    if endpoint is None:
        from cli import local

        endpoint = local.ensure_running()
    return Client(endpoint)
