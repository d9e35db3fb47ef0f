"""`dstack dashboard`: prints the web dashboard's URL (the coordinator's HTTP API serves it at /) and,
when asked, opens it in a browser. The URL never carries the token: the page asks for it."""

from __future__ import annotations

import os
import sys
import webbrowser

from dstack.cli.errors import CliError
from dstack.cli.home import load_configured

URL_ENV = "DSTACK_DASHBOARD_URL"


class NoDashboardUrl(CliError):
    pass


def dashboard_url(url: str | None) -> tuple[str, str]:
    """The dashboard's URL and where the token to log in with is."""
    if url or os.environ.get(URL_ENV):
        return (url or os.environ[URL_ENV]).rstrip("/") + "/", "your token (`dstack config` stored it)"
    if load_configured() is not None:
        raise NoDashboardUrl(
            "a team coordinator is configured: its dashboard is at the URL of its HTTP API"
            " (`dstack server --http-port PORT`; the server prints it and writes STATE_DIR/http-url)."
            f" Pass it: `dstack dashboard --url https://HOST:PORT`, or set {URL_ENV}"
        )
    from dstack.cli import local

    local.ensure_running()
    path = local.local_dir() / "server" / "http-url"
    try:
        found = path.read_text().strip()
    except OSError as e:
        raise NoDashboardUrl(
            f"the local coordinator has not written its HTTP URL to {path} ({e}): `dstack local stop`, then retry"
        ) from None
    return found + "/", f"the local admin token in {local.local_dir() / 'admin-token'}"


def dashboard_command(url: str | None, open_browser: bool) -> None:
    found, token_hint = dashboard_url(url)
    print(found)
    print(f"log in with {token_hint}", file=sys.stderr)
    if open_browser and not webbrowser.open(found):
        print("no browser could be opened here: open the URL above yourself", file=sys.stderr)
