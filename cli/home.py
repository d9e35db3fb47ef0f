"""Where the CLI keeps its state: $DSTACK_HOME (default ~/.dstack)."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, NamedTuple

from dstack.cli.errors import CliError

if TYPE_CHECKING:  # pathlib costs ~3 ms to import: the quick commands (cli/quick.py) read the config without it
    from pathlib import Path

CONFIG_FILE = "config.yaml"


def _home_dir() -> str:
    # The same as Path(...).expanduser().resolve() (resolve without strict is realpath).
    return os.path.realpath(os.path.expanduser(os.environ.get("DSTACK_HOME") or "~/.dstack"))


def dstack_home() -> Path:
    from pathlib import Path

    return Path(_home_dir())


class Endpoint(NamedTuple):
    address: str  # HOST:PORT or unix:///path
    token: str
    local: bool = False
    # TCP only (a unix socket is plaintext): the CA the coordinator's certificate must chain to (a PEM file;
    # none: the system's roots), or plaintext when `insecure`.
    ca_file: str = ""
    insecure: bool = False

    @property
    def plaintext(self) -> bool:
        return self.insecure or self.address.startswith("unix:")


def pinned_ca_path() -> Path:
    """Where `dstack config` keeps the CA it pinned (0600)."""
    return dstack_home() / "coordinator-ca.pem"


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def config_path() -> Path:
    return dstack_home() / CONFIG_FILE


def load_configured() -> Endpoint | None:
    """The coordinator set with `dstack config`, or None for the embedded local mode."""
    address = os.environ.get("DSTACK_COORDINATOR")
    token = os.environ.get("DSTACK_TOKEN", "")
    if address:
        return Endpoint(
            address,
            token,
            ca_file=os.environ.get("DSTACK_CA_FILE", ""),
            insecure=truthy(os.environ.get("DSTACK_INSECURE")),
        )
    path = os.path.join(_home_dir(), CONFIG_FILE)  # config_path(), as a string
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    data = _read_config(path, text)
    if not isinstance(data, dict) or not data.get("coordinator"):
        return None
    return Endpoint(
        str(data["coordinator"]),
        str(data.get("token", "")),
        ca_file=str(data.get("ca_file") or ""),
        insecure=data.get("insecure") is True,
    )


def _read_config(path: str, text: str) -> object:
    """The config file's document. `dstack config` writes it as JSON, which is YAML too, and which the json
    module reads in a fraction of what importing yaml costs every command (~12 ms of CPU); a file written by
    an older dstack, or edited by hand, is read as YAML."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise CliError(f"{path}: not valid YAML ({e}); fix it or run `dstack config` again") from None


def config_source() -> str:
    """Where the configured coordinator comes from, for `dstack config`."""
    return "DSTACK_COORDINATOR" if os.environ.get("DSTACK_COORDINATOR") else str(config_path())


def save_config(address: str, token: str, ca_file: str = "", insecure: bool = False) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, object] = {"coordinator": address, "token": token}
    if ca_file:
        data["ca_file"] = ca_file
    if insecure:
        data["insecure"] = True
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        # JSON is YAML: a dstack that reads the file with yaml (older ones) reads the same values.
        json.dump(data, f, indent=2)
        f.write("\n")
    return path


def clear_config() -> None:
    config_path().unlink(missing_ok=True)
