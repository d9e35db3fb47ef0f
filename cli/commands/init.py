"""`dstack init` and `dstack config`."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dstack.cli.errors import CliError

if TYPE_CHECKING:
    from dstack.cli.home import Endpoint

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


@dataclass(frozen=True)
class TlsChoice:
    """How `dstack config` is told to reach a TCP coordinator: a CA file, a CA fingerprint, or plaintext."""

    ca_file: str = ""
    ca_fingerprint: str = ""
    insecure: bool = False


INSECURE_WARNING = (
    "warning: --insecure: the token, secrets and logs cross the network in plaintext, readable by anyone on the"
    " path, and nothing proves the server is your coordinator"
)


def config_command(coordinator: str, token: str, local: bool, check: bool = True, tls: TlsChoice = TlsChoice()) -> None:
    from dstack.cli.home import clear_config, config_path, save_config, truthy

    if local:
        clear_config()
        print("using the embedded local coordinator")
        return
    if not coordinator:
        show_config()
        return
    if sum([bool(tls.ca_file), bool(tls.ca_fingerprint), tls.insecure]) > 1:
        raise CliError("give one of --ca-file, --ca-fingerprint and --insecure")
    if tls == TlsChoice():  # none given: the environment's, as for every other command
        tls = TlsChoice(
            ca_file=os.environ.get("DSTACK_CA_FILE", ""), insecure=truthy(os.environ.get("DSTACK_INSECURE"))
        )
    if tls.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    # The CA is read (or fetched with the fingerprint) before the token is asked for or sent anywhere.
    ca_pem = _pinned_ca(coordinator, tls)
    if token == "-" or (not token and not sys.stdin.isatty()):
        token = sys.stdin.readline().strip()  # `dstack config --token - < FILE`: out of shell history
    if not token:
        import getpass

        token = getpass.getpass("token: ")

    def save() -> Path:
        from dstack.cli.home import pinned_ca_path

        ca_file = ""
        if ca_pem is not None:
            from dstack.tls import save_pem

            save_pem(pinned_ca_path(), ca_pem)
            ca_file = str(pinned_ca_path())
        return save_config(coordinator, token, ca_file=ca_file, insecure=tls.insecure)

    if not check:
        save()
        print(f"saved {coordinator} to {config_path()} without checking it; `dstack config` checks it")
        return
    try:
        user = _check(coordinator, token, tls.insecure, ca_pem)
    except CliError as e:
        raise CliError(f"{e}\nnothing was saved (`--no-check` saves it anyway)") from None
    save()
    print(f"connected to {coordinator} as {user}{_pin_note(ca_pem)}; saved to {config_path()}")


def _pin_note(ca_pem: bytes | None) -> str:
    if ca_pem is None:
        return ""
    from dstack.tls import fingerprint

    return f" (TLS, CA {fingerprint(ca_pem)} pinned)"


def _pinned_ca(address: str, tls: TlsChoice) -> bytes | None:
    """The CA certificate to pin: read from --ca-file, or taken from the server's chain by --ca-fingerprint."""
    import ssl

    from dstack.cli.errors import CoordinatorUnreachable, TlsMismatch
    from dstack.tls import FingerprintMismatch, TlsSetupError, parse_fingerprint, pin_by_fingerprint, read_ca_file

    if address.startswith("unix:") and (tls.ca_file or tls.ca_fingerprint):
        raise CliError(f"{address} is a unix socket: it is plaintext, and needs no CA")
    try:
        if tls.ca_file:
            return read_ca_file(Path(tls.ca_file).expanduser())
        if not tls.ca_fingerprint:
            return None
        expected = parse_fingerprint(tls.ca_fingerprint)
        try:
            return pin_by_fingerprint(address, expected, timeout=5.0)
        except FingerprintMismatch as e:
            raise TlsMismatch(f"{e}; nothing was sent to it, and nothing was saved") from None
        except ssl.SSLError as e:
            raise TlsMismatch(
                f"the coordinator at {address} did not complete a TLS handshake ({e.reason or e}): is it one started"
                " with --insecure? Then use --insecure here too, on a network you trust completely"
            ) from None
        except OSError as e:
            raise CoordinatorUnreachable(
                f"cannot reach the coordinator at {address}: {e.strerror or e}. Check the address and that it"
                " is running"
            ) from None
    except TlsSetupError as e:
        raise CliError(str(e)) from None


def _check(address: str, token: str, insecure: bool = False, ca_pem: bytes | None = None) -> str:
    """The user the coordinator at `address` knows `token` as; an error that says what went wrong."""
    from dstack.cli.client import Client
    from dstack.cli.errors import AuthError
    from dstack.cli.home import Endpoint
    from dstack.tls import Transport

    endpoint = Endpoint(address, token, insecure=insecure, ca_file="(the CA being pinned)" if ca_pem else "")
    via = Transport(ca_pem=ca_pem) if ca_pem is not None else None
    client = Client(endpoint, timeout=5.0, via=via)
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
    print(f"transport: {_transport_line(ep.plaintext, ep.ca_file)}")
    print(f"user: {_check_endpoint(ep)}")


def _transport_line(plaintext: bool, ca_file: str) -> str:
    if plaintext:
        return "plaintext"
    if not ca_file:
        return "TLS, verified with the system's CA certificates"
    from dstack.tls import TlsSetupError, fingerprint, read_ca_file

    try:
        return f"TLS, CA pinned in {ca_file} ({fingerprint(read_ca_file(Path(ca_file).expanduser()))})"
    except TlsSetupError as e:
        return f"TLS, but {e}"


def _check_endpoint(ep: Endpoint) -> str:
    from dstack.cli.client import Client

    client = Client(ep, timeout=5.0)
    try:
        return client.info().user
    finally:
        client.close()
