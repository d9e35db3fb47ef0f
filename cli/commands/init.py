"""`dstack init` and `dstack config`."""

from __future__ import annotations

from pathlib import Path

from cli.errors import CliError

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


def config_command(coordinator: str, token: str, local: bool) -> None:
    from cli.home import clear_config, config_path, load_configured, save_config

    if local:
        clear_config()
        print("using the embedded local coordinator")
        return
    if not coordinator:
        ep = load_configured()
        print(f"coordinator: {ep.address}" if ep else "coordinator: local (embedded)")
        return
    if not token:
        import getpass

        token = getpass.getpass("token: ")
    from cli.client import Client
    from cli.home import Endpoint

    client = Client(Endpoint(coordinator, token), timeout=5.0)
    try:
        info = client.info()
    finally:
        client.close()
    save_config(coordinator, token)
    print(f"connected to {coordinator} as {info.user}; saved to {config_path()}")
