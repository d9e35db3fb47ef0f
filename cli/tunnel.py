"""Local ends of port tunnels (docs/tunnels.md): `dstack port-forward`, `dstack attach` and `dstack run`.

A `Forwarder` listens on 127.0.0.1 only (never on other interfaces: a tunnel runs code as the run's
owner, so nobody else on the network may use it) and relays each accepted connection over its own
`ClientService.Tunnel` stream (protos/tunnel.py). All streams share one HTTP/2 channel. The relaying
happens on an asyncio loop in a thread of its own, so the commands stay blocking code that follows
logs as before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from dstack.cli.client import CHANNEL_OPTIONS, transport
from dstack.cli.errors import CliError, RequestRejected
from dstack.cli.home import Endpoint
from dstack.protos.tunnel import CHANNEL_OPTIONS as TUNNEL_OPTIONS
from dstack.protos.tunnel import FRAME_BYTES, TunnelError, relay, reset
from dstack.protos.v1 import client_pb2, client_pb2_grpc, common_pb2

T = TypeVar("T")
LOCALHOST = "127.0.0.1"
ERROR_REPEAT_S = 10.0  # the same error, for many connections at once, is said once in this time
# How long closing waits for the connections to reset and the channel to close: a Ctrl-C returns promptly
# even when a peer or the coordinator does not answer (the process is exiting: what is left is dropped).
CLOSE_WAIT_S = 5.0


@dataclass(frozen=True)
class PortSpec:
    """`[LOCAL:]REMOTE` of `dstack port-forward`."""

    remote: int
    # 0: any free port. Never the remote's number by default: with the embedded local mode the job runs
    # on this host, and a listener that got there first would take the port from the job's server.
    local: int = 0

    @classmethod
    def parse(cls, text: str) -> PortSpec:
        parts = text.split(":")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (1, 2) or not all(0 < n < 65536 for n in numbers[-1:]) or numbers[0] < 0:
            raise RequestRejected(f"{text!r} is not [LOCAL:]REMOTE: two port numbers, e.g. 8888 or 9000:8888")
        if len(numbers) == 2:
            if numbers[0] > 65535:
                raise RequestRejected(f"{numbers[0]} is not a TCP port")
            return cls(numbers[1], numbers[0])
        return cls(numbers[0])


@dataclass(frozen=True)
class Forward:
    run_name: str
    job_name: str
    remote: int
    local: int
    app: str = ""
    url_path: str = ""

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.local}/{self.url_path.lstrip('/')}"


class Forwarder:
    def __init__(self, endpoint: Endpoint, on_error: Callable[[str], None]) -> None:
        self._endpoint = endpoint
        self._metadata = [("authorization", f"Bearer {endpoint.token}")]
        self._on_error = on_error
        self._said: dict[str, float] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dstack-tunnels", daemon=True)
        self._thread.start()
        self._servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._closed = False
        self._stub = self._run(self._open_stub())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _open_stub(self) -> client_pb2_grpc.ClientServiceStub:
        t = transport(self._endpoint)
        options = [*CHANNEL_OPTIONS, *TUNNEL_OPTIONS]
        if t.insecure:
            self._channel = grpc.aio.insecure_channel(self._endpoint.address, options=options)
        else:
            self._channel = grpc.aio.secure_channel(
                self._endpoint.address, t.credentials(), options=[*options, *t.options()]
            )
        return client_pb2_grpc.ClientServiceStub(self._channel)

    def forward(self, run_name: str, job_name: str, remote: int, local: int = 0) -> int:
        """Listens on 127.0.0.1:`local` (0: any free port) and returns the port it got."""
        target = common_pb2.TunnelTarget(run_name=run_name, job_name=job_name, port=remote)
        try:
            return self._run(self._listen(target, local))
        except OSError as e:
            hint = ": choose another LOCAL port" if e.errno == errno.EADDRINUSE else ""
            raise CliError(f"cannot listen on {LOCALHOST}:{local}: {e.strerror or e}{hint}") from None

    async def _listen(self, target: common_pb2.TunnelTarget, local: int) -> int:
        server = await asyncio.start_server(
            lambda r, w: self._accepted(target, r, w), LOCALHOST, local, limit=FRAME_BYTES
        )
        self._servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    def _accepted(self, target: common_pb2.TunnelTarget, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._connection(target, r, w))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _connection(
        self, target: common_pb2.TunnelTarget, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        call = self._stub.Tunnel(metadata=self._metadata)
        try:
            await call.write(common_pb2.TunnelFrame(open=target))
            await relay(call, reader, writer)
            # The coordinator's status: OK once both ways closed; an error after the data (rare) is said.
            if (code := await call.code()) != grpc.StatusCode.OK:
                self._say(await call.details() or code.name)
        except grpc.aio.AioRpcError as e:
            reset(writer)
            if e.code() != grpc.StatusCode.CANCELLED or not self._closed:
                self._say(e.details() or e.code().name)
        except (TunnelError, OSError) as e:
            reset(writer)
            self._say(str(e))
        except asyncio.CancelledError:
            reset(writer)
            raise
        except Exception as e:  # a connection must not end the others; the user sees why it broke
            reset(writer)
            self._say(f"the connection broke: {type(e).__name__}: {e}")
        finally:
            call.cancel()

    def _say(self, message: str) -> None:
        now = time.monotonic()
        if now - self._said.get(message, float("-inf")) >= ERROR_REPEAT_S:
            self._said[message] = now
            self._on_error(message)

    def close(self) -> None:
        """Stops listening and resets the open connections (their local peers see the tunnel close)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(RuntimeError, concurrent.futures.TimeoutError):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(CLOSE_WAIT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CLOSE_WAIT_S)
        if not self._thread.is_alive():  # a loop still running cannot be closed: its daemon thread is left
            self._loop.close()

    async def _shutdown(self) -> None:
        for s in self._servers:
            s.close()
        for t in list(self._connections):
            t.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._channel.close()


def run_ports(run: client_pb2.Run) -> list[tuple[client_pb2.Job, common_pb2.PortSpec]]:
    """The ports of the run's jobs, job by job: those the spec declares (with their app and url_path), then
    those the agent picked for `ports: N` once the job runs (recorded in Job.ports)."""
    out = []
    for j in run.jobs:
        declared = {p.container_port for p in j.spec.ports}
        out += [(j, p) for p in j.spec.ports]
        out += [(j, p) for p in j.ports if p.container_port not in declared]
    return out


def expected_ports(run: client_pb2.Run) -> int:
    """How many ports the run's jobs will have once they all run (list form plus `ports: N`)."""
    return sum(len(j.spec.ports) + j.spec.port_count for j in run.jobs)


def open_run_tunnels(forwarder: Forwarder, run: client_pb2.Run, running_only: bool = True) -> list[Forward]:
    """A local port (any free one) for each port of the run's running jobs."""
    out = []
    for job, port in run_ports(run):
        if running_only and job.status != common_pb2.JOB_STATUS_RUNNING:
            continue
        remote = port.container_port
        local = forwarder.forward(run.name, job.job_name, remote)
        out.append(Forward(run.name, job.job_name, remote, local, port.app, port.url_path))
    return out


def describe(f: Forward, several_jobs: bool) -> str:
    what = f.app or f"port {f.remote}"
    if several_jobs:
        what = f"{f.job_name}: {what}"
    return f"{what}: {f.url}"
