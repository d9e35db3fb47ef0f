"""`python -m dstack.coordinator` / `dstack server`: options, secrets on disk, logging."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sys
from pathlib import Path

from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.server import StartError, serve
from dstack.storage.private import private_dir

log = logging.getLogger(__name__)


def read_or_create_secret(path: Path) -> str:
    """Tokens live in 0600 files beside the database, created on first start."""
    if path.exists():
        return path.read_text().strip()
    private_dir(path.parent, log)  # the state directory, made before the server locks it
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def parse_args(argv: list[str] | None = None) -> CoordinatorConfig:
    p = argparse.ArgumentParser(prog="dstack server", description="Runs a dstack coordinator.")
    p.add_argument("--state-dir", default=os.environ.get("DSTACK_SERVER_DIR", "~/.dstack/server"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--listen", default="", help="unix:///path.sock or HOST:PORT (overrides --host/--port)")
    p.add_argument(
        "--storage",
        default=os.environ.get("DSTACK_STORAGE", ""),
        help="artifact store: s3://BUCKET/PREFIX (endpoint and credentials from the standard AWS settings) or a"
        " folder (default: STATE_DIR/storage)",
    )
    p.add_argument("--archive-logs-after", type=float, default=600.0, help="seconds after a job ends")
    p.add_argument("--archive-interval", type=float, default=30.0, help=argparse.SUPPRESS)
    p.add_argument("--retention-days", type=float, default=None, help="delete logs of runs finished this long ago")
    p.add_argument(
        "--retention-artifacts", action="store_true", help="with --retention-days: also artifacts of untagged runs"
    )
    p.add_argument("--lease-timeout", type=float, default=15.0, help="seconds without heartbeat: agent lost")
    p.add_argument("--heartbeat-interval", type=float, default=3.0)
    p.add_argument(
        "--reconnect-grace",
        type=float,
        default=30.0,
        help="seconds agents get on top of --lease-timeout to reconnect after the coordinator (re)starts",
    )
    p.add_argument(
        "--forget-lost-agents-after",
        type=float,
        default=86400.0,
        metavar="SECONDS",
        help="lost agents not heard from for this long leave `dstack agents` (their names are free anyway)",
    )
    p.add_argument(
        "--approve-agents",
        action="store_true",
        help="new agents wait in `dstack agents` as `pending approval`, with no job, until"
        " `dstack agents approve NAME`",
    )
    p.add_argument("--fail-unsatisfiable", action="store_true", help="fail jobs no agent can ever run")
    p.add_argument("--local-mode", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    state = Path(a.state_dir).expanduser().resolve()
    return CoordinatorConfig(
        state_dir=state,
        listen=a.listen or f"{a.host}:{a.port}",
        storage_url=a.storage or str(state / "storage"),
        admin_token=os.environ.get("DSTACK_ADMIN_TOKEN") or read_or_create_secret(state / "admin-token"),
        join_token=os.environ.get("DSTACK_JOIN_TOKEN") or read_or_create_secret(state / "join-token"),
        lease_timeout_s=a.lease_timeout,
        heartbeat_interval_s=a.heartbeat_interval,
        reconnect_grace_s=a.reconnect_grace,
        forget_lost_agents_after_s=a.forget_lost_agents_after,
        fail_unsatisfiable=a.fail_unsatisfiable,
        local_mode=a.local_mode,
        approve_agents=a.approve_agents,
        archive_after_s=a.archive_logs_after,
        archive_interval_s=a.archive_interval,
        retention_days=a.retention_days,
        retention_artifacts=a.retention_artifacts,
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=os.environ.get("DSTACK_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    config = parse_args(argv)
    if not config.local_mode:
        print(f"dstack coordinator on {config.listen}; state in {config.state_dir}", file=sys.stderr)
        print(
            f"admin token: {config.state_dir / 'admin-token'}; join token: {config.state_dir / 'join-token'}",
            file=sys.stderr,
        )
        print(
            "join tokens with an expiry and a use limit: `dstack join-tokens create --ttl 24h --uses 1`"
            + ("; new agents wait for `dstack agents approve NAME`" if config.approve_agents else ""),
            file=sys.stderr,
        )
    try:
        asyncio.run(serve(config))
    except StartError as e:
        print(f"dstack server: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
