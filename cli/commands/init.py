"""`dstack init` and `dstack config`."""

from __future__ import annotations

import sys
from pathlib import Path

from dstack.cli.errors import CliError

EXAMPLE = """\
workflows:
  - name: hello
    help: "Prints a greeting"
    provider: bash
    commands:
      - echo "Hello, world!"
"""


def init_command(root: Path) -> None:
    path = root / ".dstack" / "workflows.yaml"
    if path.exists():
        raise CliError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(EXAMPLE)
    print(f"created {path}; try `dstack run hello`")


def config_command(coordinator: str, token: str, local: bool, check: bool = True) -> None:
    from dstack.cli.home import clear_config, config_path, save_config

    if local:
        clear_config()
        print("using the embedded local coordinator")
        return
    if not coordinator:
        show_config()
        return
    if token == "-" or (not token and not sys.stdin.isatty()):
        token = sys.stdin.readline().strip()  # `dstack config --token - < FILE`: out of shell history
    if not token:
        import getpass

        token = getpass.getpass("token: ")
    if not check:
        save_config(coordinator, token)
        print(f"saved {coordinator} to {config_path()} without checking it; `dstack config` checks it")
        return
    try:
        user = _check(coordinator, token)
    except CliError as e:
        raise CliError(f"{e}\nnothing was saved (`--no-check` saves it anyway)") from None
    save_config(coordinator, token)
    print(f"connected to {coordinator} as {user}; saved to {config_path()}")


def _check(address: str, token: str) -> str:
    """The user the coordinator at `address` knows `token` as; an error that says what went wrong."""
    from dstack.cli.client import Client
    from dstack.cli.errors import AuthError
    from dstack.cli.home import Endpoint

    client = Client(Endpoint(address, token), timeout=5.0)
    try:
        return client.info().user
    except AuthError as e:
        raise AuthError(f"the coordinator at {address} refused the token: {e}") from None
    finally:
        client.close()


def show_config() -> None:
    """Which coordinator and user the CLI uses, and where that comes from; an error if it does not answer."""
    from dstack.cli.home import config_source, load_configured

    ep = load_configured()
    if ep is None:
        from dstack.cli import local

        print(f"coordinator: local (embedded; state in {local.local_dir()})")
        print("local services: " + ("running" if local.is_running() else "not running (started on first use)"))
        return
    print(f"coordinator: {ep.address} (from {config_source()})")
    print(f"user: {_check(ep.address, ep.token)}")
