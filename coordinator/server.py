"""Builds the coordinator's gRPC server and runs it until cancelled."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import resource
import signal
import socket
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dstack.coordinator.app.core import Core
from dstack.coordinator.app.streams import raise_fd_limit
from dstack.coordinator.artifacts import Artifacts
from dstack.coordinator.auth import Authenticator, AuthInterceptor
from dstack.coordinator.clock import SYSTEM_CLOCK, Clock, clock_from_env
from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.engine import Engine
from dstack.coordinator.errors import SecretUnreadable
from dstack.coordinator.retention import Retention
from dstack.coordinator.services.agent import AgentService
from dstack.coordinator.services.client import ClientService
from dstack.coordinator.services.generic_only import generic_only
from dstack.coordinator.store import Store
from dstack.coordinator.store.executor import DbExecutor
from dstack.coordinator.store.reader import ReadExecutor
from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, client_pb2, client_pb2_grpc
from dstack.storage import StoreError, open_store
from dstack.storage.private import private_dir, tighten_file

if TYPE_CHECKING:
    from dstack.coordinator.http.server import HttpServer
    from dstack.coordinator.tls import ServerTls

log = logging.getLogger("dstack.coordinator")

# Generous limits: log batches and code chunks are bounded by the senders, not by gRPC defaults.
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # gRPC sets SO_REUSEPORT by default: a second coordinator on the same port would then start
    # and the kernel would split connections between the two (tokens of one fail on the other).
    ("grpc.so_reuseport", 0),
]


class StartError(Exception):
    """The coordinator cannot start; the message says why."""


UNWRITABLE = {"SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_FULL", "SQLITE_IOERR"}


def database_error(path: Path, e: sqlite3.DatabaseError | OSError) -> str:
    """What an admin can do about a database the coordinator cannot open or write."""
    if isinstance(e, OSError):
        return f"cannot open the database {path}: {e.strerror or e}; the state folder must be writable by this user"
    name = getattr(e, "sqlite_errorname", "")
    if name in UNWRITABLE or name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_IOERR")):
        return (
            f"cannot write the database {path} ({e}): the state folder (--state-dir) and the files in it must be"
            " writable by this user, on a disk with free space"
        )
    return (
        f"the database {path} is damaged or not a dstack database ({e}): restore it from a backup, or move it"
        " aside to start with an empty state (runs, users and tokens in it are then lost)"
    )


def lock_state_dir(state_dir: Path) -> int:
    """One coordinator per state directory: two writing one database would corrupt runs.

    The directory is the owner's only (0700; tightened with a log line when it was not), and so are the
    files in it that hold secrets (0600): tokens, the secrets key, the database."""
    private_dir(state_dir, log)
    for name in ("admin-token", "join-token", "secrets.key"):
        tighten_file(state_dir / name, log)
    fd = os.open(state_dir / "coordinator.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        raise StartError(f"another coordinator (pid {holder or '?'}) is already using {state_dir}") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd  # held open for the life of the process


ADDRESS_IN_USE = "the address is in use (another coordinator?)"


def unix_socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:  # none there, or a file left by a process that is gone
            return False
    return True


def tcp_bind_error(listen: str) -> OSError | None:
    """Binds HOST:PORT the way gRPC does (SO_REUSEADDR, no SO_REUSEPORT) and lets go at once.

    Returns the error of the first address that cannot be bound, if any. gRPC's own bind says only
    "no address added", and logs that at the C level; this check gives the reason in one line.
    """
    if listen.startswith("unix://"):
        return None
    host, _, port = listen.rpartition(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError) as e:
        return OSError(errno.EINVAL, f"not a usable address ({e})")
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            # As gRPC: a port whose old connections linger in TIME_WAIT (a restart) can be bound.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                return e
    return None


def _reason(e: OSError | None) -> str:
    if e is None:
        return "gRPC could not bind it"
    if e.errno == errno.EADDRINUSE:
        return ADDRESS_IN_USE
    return e.strerror or str(e)


@dataclass
class Coordinator:
    """A started coordinator: what `serve` runs until a signal, and what in-process tests drive."""

    server: grpc.aio.Server
    engine: Engine
    port: int  # the bound TCP port (the one picked for HOST:0); 0 for a unix socket
    _store: Store
    _db: DbExecutor
    _retention: asyncio.Task[None]
    _lock_fd: int
    tls: ServerTls | None = None  # what it serves over TCP; None: plaintext (a unix socket, or --insecure)
    http: HttpServer | None = None  # the HTTP API and /metrics, when --http-port is given
    health: health.aio.HealthServicer | None = None
    _reads: ReadExecutor | None = None  # read-only calls' threads (coordinator/store/reader.py)

    async def stop(self, grace: float = 1.0) -> None:
        log.info("coordinator stopping")
        if self.health is not None:
            await self.health.enter_graceful_shutdown()  # load balancers stop sending first
        if self.http is not None:
            await self.http.stop()
        self._retention.cancel()
        await asyncio.gather(self._retention, return_exceptions=True)
        await self.engine.stop()
        await self.server.stop(grace=grace)
        self._db.shutdown()
        if self._reads is not None:
            self._reads.shutdown()
        self._store.close()
        os.close(self._lock_fd)  # a coordinator started again in this process takes the lock anew


async def start(config: CoordinatorConfig, clock: Clock = SYSTEM_CLOCK) -> Coordinator:
    """Opens the state, binds, and starts serving; `clock` paces leases (tests pass a manual one)."""
    try:
        lock_fd = lock_state_dir(config.state_dir)
    except OSError as e:  # a read-only or foreign folder, a full disk
        raise StartError(
            f"cannot use the state folder {config.state_dir}: {e.strerror or e}; it must be a folder this user"
            " can write (dstack server --state-dir)"
        ) from None
    try:
        return await _start(config, clock, lock_fd)
    except BaseException:
        os.close(lock_fd)
        raise


def log_fd_limit(config: CoordinatorConfig) -> None:
    """Raises the open files limit to the hard limit, and says what the coordinator has to work with."""
    soft, hard = raise_fd_limit()
    shown = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    log.info("open files limit: %d (hard limit %s); each agent and each open stream holds one", soft, shown)
    if config.max_streams > 0 and soft < config.max_streams + 1024:
        log.warning(
            "the open files limit (%d) leaves little room beside --max-streams %d and the agents' connections:"
            " raise the hard limit (`ulimit -Hn`, LimitNOFILE= in a systemd unit) or lower --max-streams",
            soft,
            config.max_streams,
        )


async def _start(config: CoordinatorConfig, clock: Clock, lock_fd: int) -> Coordinator:
    log_fd_limit(config)
    # Before anything else starts, and before gRPC's bind, which would log a C-level error first.
    in_use = await asyncio.to_thread(tcp_bind_error, config.listen)
    if in_use is not None and in_use.errno == errno.EADDRINUSE:
        raise StartError(f"cannot listen on {config.listen}: {ADDRESS_IN_USE}")
    try:
        store = Store(config.db_path, clock=clock.time_ns)
    except (sqlite3.DatabaseError, OSError) as e:
        raise StartError(database_error(config.db_path, e)) from None
    db = DbExecutor(store)
    try:
        await db(store.ensure_user, "admin", config.admin_token, "admin")
        # The server's own join token is the join token 'default' (revocable; revoked, it stays so).
        await db(store.ensure_default_join_token, config.join_token)
    except (sqlite3.DatabaseError, OSError) as e:
        db.shutdown()
        store.close()
        raise StartError(database_error(config.db_path, e)) from None
    try:
        object_store = open_store(config.storage_url)
        await asyncio.to_thread(object_store.check)
    except StoreError as e:
        raise StartError(f"storage {config.storage_url}: {e}") from None
    log.info("artifacts in %s", object_store.description)
    artifacts = Artifacts(object_store)
    # Opened once the writer has created and migrated the database.
    reads = ReadExecutor(config.db_path, clock.time_ns)
    engine = Engine(config, store, db, clock)
    # Before we listen (below): a hello ack publishes the reconnect grace only once the lease that covers it is
    # kept for every later start (coordinator/restart_lease.py).
    await engine.keep_restart_lease()
    engine.copy_cached = artifacts.reuse
    retention = Retention(config, store, db, artifacts)
    auth = Authenticator(store, db, reads)
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[AuthInterceptor(auth)])
    core = Core(engine, artifacts, reads)
    client_pb2_grpc.add_ClientServiceServicer_to_server(ClientService(core), generic_only(server))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentService(core), generic_only(server))
    health_servicer = await add_health_and_reflection(server)
    if config.listen.startswith("unix://"):
        # A socket file left by a killed coordinator would make the bind fail; one that a live process
        # answers on belongs to another coordinator, which deleting it would silently cut off.
        path = Path(config.listen[len("unix://") :])
        if await asyncio.to_thread(unix_socket_answers, path):
            raise StartError(f"cannot listen on {config.listen}: another process is listening there")
        await asyncio.to_thread(path.unlink, missing_ok=True)
    tls = await asyncio.to_thread(server_tls, config)
    try:
        if tls is None:
            port = server.add_insecure_port(config.listen)
        else:
            creds = grpc.ssl_server_credentials([(tls.key_pem, tls.chain_pem)])
            port = server.add_secure_port(config.listen, creds)
    except RuntimeError:
        port = 0
    if port == 0:
        why = _reason(await asyncio.to_thread(tcp_bind_error, config.listen))
        raise StartError(f"cannot listen on {config.listen}: {why}")
    http = await _start_http(config, core, auth, tls)
    await server.start()
    try:
        await engine.start()
    except (sqlite3.DatabaseError, OSError, SecretUnreadable) as e:
        # A damaged page that opening and migrating did not read (the waiting jobs', the secrets'), a secret
        # the key cannot decrypt: a clear exit, with what started so far stopped (tests start in-process).
        if http is not None:
            await http.stop()
        await engine.stop()
        await server.stop(grace=None)
        db.shutdown()
        reads.shutdown()
        store.close()
        raise StartError(str(e) if isinstance(e, SecretUnreadable) else database_error(config.db_path, e)) from None
    retention_task = asyncio.create_task(retention.run_forever())
    log.info("coordinator listening on %s (pid %d)", config.listen, os.getpid())
    unix = config.listen.startswith("unix://")
    return Coordinator(
        server, engine, 0 if unix else port, store, db, retention_task, lock_fd, tls, http, health_servicer, reads
    )


SERVED = (
    client_pb2.DESCRIPTOR.services_by_name["ClientService"].full_name,
    agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
)


async def add_health_and_reflection(server: grpc.aio.Server) -> health.aio.HealthServicer:
    """grpc.health.v1 (public: coordinator/auth.py) reports SERVING for the server ("") and each of our
    services until the coordinator stops; reflection lets `grpcurl` list and call them."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, generic_only(server))
    for name in ("", *SERVED):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    # Not generic_only: the reflection service checks that it is given a grpc.aio.Server (its one method
    # adds one pending request to the server's wait, not 55).
    reflection.enable_server_reflection((*SERVED, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return servicer


async def _start_http(
    config: CoordinatorConfig, core: Core, auth: Authenticator, tls: ServerTls | None
) -> HttpServer | None:
    if config.http_port is None:
        return None
    from dstack.coordinator.http.server import start_http

    scrape_token = None
    if config.metrics_token_file is not None:
        try:
            scrape_token = (await asyncio.to_thread(config.metrics_token_file.read_text)).strip() or None
        except OSError as e:
            raise StartError(f"--metrics-token-file {config.metrics_token_file}: {e.strerror or e}") from None
        if scrape_token is None:
            raise StartError(f"--metrics-token-file {config.metrics_token_file} is empty")
    host = config.http_bind_host
    try:
        http = await start_http(core, auth, host, config.http_port, tls, config.state_dir, scrape_token)
    except OSError as e:
        why = ADDRESS_IN_USE if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise StartError(f"cannot serve HTTP on {host}:{config.http_port}: {why}") from None
    await asyncio.to_thread(config.http_url_path.write_text, http.url + "\n")
    log.info("HTTP API on %s (OpenAPI: %s/api/openapi.json, metrics: %s/metrics)", http.url, http.url, http.url)
    return http


INSECURE_WARNING = (
    "serving PLAINTEXT on %s (--insecure): tokens, secrets and logs cross the network readable by anyone on"
    " the path, and anyone who can answer in the coordinator's place gets the agents' jobs and secrets;"
    " use it only on a network you trust completely"
)


def server_tls(config: CoordinatorConfig) -> ServerTls | None:
    """What the server presents over TCP (made on first start), or None for plaintext.

    A unix socket is plaintext: local mode needs no configuration, and the socket's 0700 folder is its
    boundary. TCP is TLS unless the config says `insecure`."""
    if config.listen.startswith("unix://"):
        return None
    if config.insecure:
        log.warning(INSECURE_WARNING, config.listen)
        return None
    from dstack.coordinator import tls  # `cryptography` only for a TCP coordinator

    try:
        if config.tls_cert is not None and config.tls_key is not None:
            return tls.load_admin_tls(config.tls_cert, config.tls_key)
        host = config.listen.rpartition(":")[0]
        return tls.ensure_server_tls(config.state_dir, host, config.tls_sans)
    except tls.TlsError as e:
        raise StartError(str(e)) from None


async def serve(
    config: CoordinatorConfig,
    ready: asyncio.Event | None = None,
    on_started: Callable[[Coordinator], None] | None = None,
) -> None:
    coordinator = await start(config, clock_from_env())
    if on_started is not None:
        on_started(coordinator)
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await coordinator.stop()
