"""`dstack users add|list|remove|rotate-token|set` (admin only, but listing and
rotating one's own token) and `dstack whoami`.

A user's token is printed once, when it is made (add, rotate-token): the coordinator keeps only its
sha256. The commands live in their own typer sub-app (`users_app`), which cli/main.py mounts at start-up:
this module imports only typer at the top (tests/unit/test_cli_imports.py).
"""

import json
import sys
from typing import Annotated

import typer

users_app = typer.Typer(
    help="The team's users: roles, tokens, fair share and quotas (admin; `users list`: everyone).",
    no_args_is_help=True,
)

ROLE_HELP = "admin: users, agents, join tokens, team secrets; member: runs; viewer: reads"


def _show_token(verb: str, name: str, role: str, token: str) -> None:
    print(f"user {name} ({role}) {verb}; their token is shown this once:")
    print(token)
    print(
        f"give it to {name} privately; they run `dstack config --coordinator HOST:PORT` and paste it when asked",
        file=sys.stderr,
    )


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="User name (lowercase letters, digits, '.', '_', '-')")],
    role: Annotated[str, typer.Option("--role", help=ROLE_HELP)] = "member",
) -> None:
    """Add a user and print their token (once)."""
    from dstack.cli.session import connect

    resp = connect().add_user(name, role)
    _show_token("added", resp.user.name, resp.user.role, resp.token)


@users_app.command("list")
def users_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """List users: name, role, when added and last seen (never a token)."""
    from dstack.cli.render import ago, iso
    from dstack.cli.session import connect

    users = connect().list_users()
    if as_json:
        out = [
            {"name": u.name, "role": u.role, "created_at": iso(u.created_at_ns), "last_seen_at": iso(u.last_seen_at_ns)}
            for u in users
        ]
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    from dstack.cli.term import Term

    rows = [[u.name, u.role, ago(u.created_at_ns), ago(u.last_seen_at_ns) or "never"] for u in users]
    Term().table(("USER", "ROLE", "ADDED", "LAST SEEN"), rows)


@users_app.command("remove")
def users_remove(name: Annotated[str, typer.Argument(help="User name")]) -> None:
    """Remove a user: their token is refused from the next call on; their personal secrets are deleted."""
    from dstack.cli.session import connect

    connect().remove_user(name)
    print(f"removed {name}: their token no longer works (their runs stay, owned by {name})")


@users_app.command("rotate-token")
def users_rotate_token(name: Annotated[str, typer.Argument(help="User name")]) -> None:
    """Give a user a new token (printed once); the old one is refused from the next call on. Anyone may
    rotate their own token; another user's needs the admin role."""
    from dstack.cli.session import connect

    resp = connect().rotate_user_token(name)
    _show_token("has a new token (the old one no longer works)", resp.user.name, resp.user.role, resp.token)


def whoami_command() -> None:
    from dstack.cli.home import load_configured
    from dstack.cli.session import connect

    client = connect()
    info = client.info()
    where = "local (embedded)" if load_configured() is None else client.endpoint.address
    print(f"user: {info.user}")
    print(f"role: {info.role or 'admin'}")  # a coordinator older than roles: its one user is the admin
    print(f"coordinator: {where}")


def set_command(name: str, share: float | None, max_gpus: int | None, max_running: int | None) -> None:
    from dstack.cli.errors import CliError
    from dstack.cli.session import connect
    from dstack.protos.v1 import client_pb2

    if share is None and max_gpus is None and max_running is None:
        raise CliError("nothing to set: give --share, --max-gpus or --max-running")
    req = client_pb2.SetUserLimitsRequest(name=name)
    if share is not None:
        req.share = share
    if max_gpus is not None:
        req.max_gpus = max_gpus
    if max_running is not None:
        req.max_running = max_running
    u = connect().set_user_limits(req)
    gpus = u.max_gpus or "no limit"
    running = u.max_running or "no limit"
    print(f"{u.name}: share {u.share:g}, max GPUs {gpus}, max running jobs {running}")
