"""`python -m dstack.coordinator` / `dstack server`: options, secrets on disk, logging."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import secrets
import socket
import sys
from pathlib import Path

from dstack.coordinator import gc_policy
from dstack.coordinator.app.limits import DEFAULT_MAX_QUEUED_PER_USER, DEFAULT_MAX_SUBMISSIONS_PER_MINUTE
from dstack.coordinator.app.streams import DEFAULT_MAX_STREAMS, DEFAULT_MAX_STREAMS_PER_USER, DEFAULT_STREAM_STALL_S
from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.server import Coordinator, StartError, serve
from dstack.storage.private import private_dir

log = logging.getLogger(__name__)


def read_or_create_secret(path: Path) -> str:
    """Tokens live in 0600 files beside the database, created on first start."""
    try:
        if path.exists():
            return path.read_text().strip()
        private_dir(path.parent, log)  # the state directory, made before the server locks it
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token
    except OSError as e:  # a read-only or foreign state folder, a full disk
        raise StartError(
            f"cannot write {path}: {e.strerror or e}; the state folder (--state-dir) must be writable by this user"
        ) from None


def _seconds_or_off(text: str) -> float:
    if text == "off":
        return math.inf
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds or 'off'") from None


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
    p.add_argument(
        "--max-log-bytes",
        type=int,
        default=1 << 30,
        help="per job: bytes of log kept at most; later lines are dropped, with one line saying so (0: no limit)",
    )
    p.add_argument(
        "--log-follow-buffer",
        type=int,
        default=2 << 20,
        metavar="BYTES",
        help="per `dstack logs -f`: bytes of new lines held for it while it sends earlier ones; a follower"
        " slower than that reads them from the database instead (default: %(default)s)",
    )
    p.add_argument(
        "--gc-grace",
        type=float,
        default=4 * 3600.0,
        metavar="SECONDS",
        help="remove code blobs no run uses, and unfinished uploads, once idle this long (default: %(default)s)",
    )
    p.add_argument("--gc-interval", type=float, default=600.0, help=argparse.SUPPRESS)
    p.add_argument("--archive-interval", type=float, default=30.0, help=argparse.SUPPRESS)
    p.add_argument("--retention-days", type=float, default=None, help="delete logs of runs finished this long ago")
    p.add_argument(
        "--retention-artifacts", action="store_true", help="with --retention-days: also artifacts of untagged runs"
    )
    p.add_argument("--lease-timeout", type=float, default=15.0, help="seconds without heartbeat: agent lost")
    p.add_argument("--heartbeat-interval", type=float, default=3.0)
    p.add_argument(
        "--self-fence",
        choices=["on", "strict", "off"],
        default="on",
        help="agents cut off for --lease-timeout stop their jobs so no job runs twice at once: on (unless the"
        " coordinator is down: its port refuses connections), strict (even then), off (never; a requeued"
        " job may run beside its cut-off attempt)",
    )
    p.add_argument(
        "--fence-margin",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="with --self-fence on/strict: a lost agent's jobs are requeued this long after its lease ran out",
    )
    p.add_argument(
        "--fence-kill-time",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="with --self-fence on/strict: agents stop their jobs this long before the coordinator may requeue"
        " them (the kill's time, and the drift between the clocks)",
    )
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
        "--fairshare",
        choices=["on", "off"],
        default="on",
        help="order waiting jobs by each user's decayed usage against their share (off: first come, first served)",
    )
    p.add_argument(
        "--fairshare-half-life",
        type=float,
        default=86400.0,
        metavar="SECONDS",
        help="usage counts half as much this long after it happened (default: one day)",
    )
    p.add_argument(
        "--approve-agents",
        action="store_true",
        help="new agents wait in `dstack agents` as `pending approval`, with no job, until"
        " `dstack agents approve NAME`",
    )
    p.add_argument(
        "--reserve-after",
        type=_seconds_or_off,
        default=300.0,
        metavar="SECONDS",
        help="a job waiting this long gets an agent reserved: smaller jobs are not placed there until it starts"
        " ('off': never); interruptible jobs are preempted for it where that lets it fit",
    )
    p.add_argument(
        "--preempt-after",
        type=_seconds_or_off,
        default=60.0,
        metavar="SECONDS",
        help="a job of a user below their fair share that waited this long and fits nowhere preempts"
        " interruptible jobs of users over theirs by --preempt-margin ('off': never; default: %(default)s)",
    )
    p.add_argument(
        "--preempt-min-run",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="no job is preempted in its first SECONDS of running (time to write a checkpoint)",
    )
    p.add_argument(
        "--preempt-margin",
        type=float,
        default=2.0,
        metavar="FACTOR",
        help="fair share preempts only jobs of users whose usage/share is over FACTOR times the waiting"
        " user's (hysteresis: two users never take GPUs back and forth)",
    )
    p.add_argument("--fail-unsatisfiable", action="store_true", help="fail jobs no agent can ever run")
    p.add_argument(
        "--max-queued-per-user",
        type=int,
        default=DEFAULT_MAX_QUEUED_PER_USER,
        metavar="N",
        help="jobs a user may have waiting to start; more are refused (0: no limit; default: %(default)s)",
    )
    p.add_argument(
        "--max-submissions-per-minute",
        type=int,
        default=DEFAULT_MAX_SUBMISSIONS_PER_MINUTE,
        metavar="N",
        help="runs a user may submit per minute, in bursts of up to N (0: no limit; default: %(default)s)",
    )
    p.add_argument(
        "--max-streams-per-user",
        type=int,
        default=DEFAULT_MAX_STREAMS_PER_USER,
        metavar="N",
        help="long-lived calls a user may hold open at once: followed logs (`dstack logs -f`, the HTTP API's event"
        " streams), tunnels (`dstack port-forward`, `attach`) and downloads; more are refused (0: no limit;"
        " default: %(default)s)",
    )
    p.add_argument(
        "--max-streams",
        type=int,
        default=DEFAULT_MAX_STREAMS,
        metavar="N",
        help="the same, for all users together (0: no limit; default: %(default)s); the coordinator also needs a"
        " file descriptor for each agent: keep N well under `ulimit -n`",
    )
    p.add_argument(
        "--stream-stall-timeout",
        type=float,
        default=DEFAULT_STREAM_STALL_S,
        metavar="SECONDS",
        help="end a stream whose client has taken nothing for this long while data waits for it (default: %(default)s)",
    )
    http = p.add_argument_group(
        "HTTP API and metrics (docs/http-api.md, docs/metrics.md)",
        "Off unless --http-port is given; served with the gRPC server's TLS and tokens.",
    )
    http.add_argument(
        "--http-port", type=int, default=None, metavar="PORT", help="serve /api/... and /metrics (0: a free port)"
    )
    http.add_argument("--http-host", default="", metavar="HOST", help="default: the gRPC host (--host/--listen)")
    http.add_argument(
        "--metrics-token-file",
        metavar="FILE",
        help="a token Prometheus may scrape /metrics with (a user's token works too)",
    )
    p.add_argument("--local-mode", action="store_true", help=argparse.SUPPRESS)
    tls = p.add_argument_group(
        "TLS (TCP only; a unix socket is always plaintext)",
        "By default the coordinator makes a private CA and a server certificate in STATE_DIR/tls/ on first"
        " start and prints the CA's fingerprint, which clients and agents pin (--ca-fingerprint).",
    )
    tls.add_argument(
        "--tls-san",
        action="append",
        default=[],
        metavar="NAME",
        help="another DNS name or IP address for the generated server certificate (repeatable)",
    )
    tls.add_argument("--tls-cert", metavar="FILE", help="serve this certificate (PEM, leaf first, then its chain)")
    tls.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM, unencrypted)")
    tls.add_argument(
        "--insecure",
        action="store_true",
        help="serve plaintext: tokens and secrets cross the network readable by anyone on the path",
    )
    a = p.parse_args(argv)
    if a.fairshare_half_life <= 0 or a.reserve_after < 0:
        p.error("--fairshare-half-life must be positive and --reserve-after not negative")
    if a.preempt_after < 0 or a.preempt_min_run < 0 or a.preempt_margin < 1:
        p.error("--preempt-after and --preempt-min-run must not be negative, --preempt-margin at least 1")
    if a.http_port is not None and not 0 <= a.http_port <= 65535:
        p.error("--http-port must be between 0 and 65535")
    if bool(a.tls_cert) != bool(a.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if a.insecure and a.tls_cert:
        p.error("--insecure serves plaintext: it cannot go with --tls-cert")
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
        self_fence=a.self_fence,
        fence_margin_s=max(0.0, a.fence_margin),
        fence_kill_s=max(0.0, a.fence_kill_time),
        forget_lost_agents_after_s=a.forget_lost_agents_after,
        fail_unsatisfiable=a.fail_unsatisfiable,
        local_mode=a.local_mode,
        approve_agents=a.approve_agents,
        archive_after_s=a.archive_logs_after,
        archive_interval_s=a.archive_interval,
        max_log_bytes=max(0, a.max_log_bytes),
        log_follow_buffer_bytes=max(0, a.log_follow_buffer),
        gc_grace_s=max(0.0, a.gc_grace),
        gc_interval_s=max(0.1, a.gc_interval),
        retention_days=a.retention_days,
        retention_artifacts=a.retention_artifacts,
        fairshare=a.fairshare == "on",
        fairshare_half_life_s=a.fairshare_half_life,
        max_queued_per_user=max(0, a.max_queued_per_user),
        max_submissions_per_minute=max(0, a.max_submissions_per_minute),
        max_streams_per_user=max(0, a.max_streams_per_user),
        max_streams=max(0, a.max_streams),
        stream_stall_s=max(0.1, a.stream_stall_timeout),
        reserve_after_s=a.reserve_after,
        preempt_after_s=a.preempt_after,
        preempt_min_run_s=a.preempt_min_run,
        preempt_margin=a.preempt_margin,
        insecure=a.insecure,
        tls_cert=Path(a.tls_cert).expanduser().resolve() if a.tls_cert else None,
        tls_key=Path(a.tls_key).expanduser().resolve() if a.tls_key else None,
        tls_sans=tuple(a.tls_san),
        http_port=a.http_port,
        http_host=a.http_host,
        metrics_token_file=Path(a.metrics_token_file).expanduser().resolve() if a.metrics_token_file else None,
    )


def banner(config: CoordinatorConfig, coordinator: Coordinator) -> str:
    """What an admin needs to connect CLIs and agents, printed once the coordinator listens."""
    state = config.state_dir
    host, _, port = config.listen.rpartition(":")
    if host.strip("[]") in ("", "0.0.0.0", "::"):
        host = socket.gethostname()  # a wildcard bind: name this machine
    address = f"{host}:{coordinator.port or port}"
    lines = [f"dstack coordinator on {config.listen}; state in {state}"]
    tls = coordinator.tls
    if tls is not None:
        lines.append(f"TLS CA fingerprint: {tls.fingerprint}")
        pin = f"--ca-fingerprint {tls.fingerprint}"
        if tls.ca_path is not None:
            lines.append(f"  (the CA certificate is {tls.ca_path}: give it with --ca-file, or pin the fingerprint)")
        elif tls.ca_pem:
            pin = "--ca-file CA.pem"  # an admin's certificate: its clients verify it as the admin set up
    else:
        pin = "--insecure"
        lines.append("PLAINTEXT (--insecure): clients and agents must say --insecure too")
    lines.append(f"join an agent:   dstack agent --coordinator {address} {pin} --join-token-file JOIN_TOKEN_FILE")
    lines.append(f"  (JOIN_TOKEN_FILE: a 0600 copy of {state / 'join-token'})")
    lines.append(f"configure a CLI: dstack config --coordinator {address} {pin}")
    lines.append(f"  (it asks for the token; the admin token is in {state / 'admin-token'})")
    if coordinator.http is not None:
        lines.append(f"HTTP API: {coordinator.http.url}/api/openapi.json; metrics: {coordinator.http.url}/metrics")
    lines.append(
        "join tokens with an expiry and a use limit: `dstack join-tokens create --ttl 24h --uses 1`"
        + ("; new agents wait for `dstack agents approve NAME`" if config.approve_agents else "")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=os.environ.get("DSTACK_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = parse_args(argv)
    except StartError as e:
        print(f"dstack server: {e}", file=sys.stderr)
        sys.exit(1)

    background: list[asyncio.Task[None]] = []  # held: the loop keeps only a weak reference to a task

    def on_started(coordinator: Coordinator) -> None:
        if not config.local_mode:
            print(banner(config, coordinator), file=sys.stderr, flush=True)
        # What start-up made (modules, protobuf descriptors, the server's objects) lives as long as the
        # process: frozen at once, out of the collector's sight, and what lives long later (agent
        # sessions, queued jobs) every few seconds; thawed and collected whole every few minutes.
        background.append(gc_policy.install(coordinator.engine.metrics.registry))

    try:
        asyncio.run(serve(config, on_started=on_started))
    except StartError as e:
        print(f"dstack server: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
