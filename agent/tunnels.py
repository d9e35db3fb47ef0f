"""The agent's end of port tunnels (docs/tunnels.md): it connects to a job's port and dials back.

The coordinator asks with `OpenTunnel{tunnel_id, job_id, port}` on the Connect stream. The agent
checks what it is asked for itself, whatever the coordinator said: the job must be one it runs now,
and the port one that job declares (a host job's port on 127.0.0.1, a container's published port).
Never any other local port: the agent's host may serve things (a database, a metadata service) that
a run's owner must not reach through it. It then calls `AgentService.Tunnel`, whose first frame names
the tunnel (or says why it could not connect), and relays (protos/tunnel.py). When the job ends, its
tunnels are closed with a frame that says so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from dstack.protos.tunnel import FRAME_BYTES, TunnelError, relay
from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, common_pb2

log = logging.getLogger("dstack.agent")

LOOPBACK = "127.0.0.1"
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class JobPorts:
    """What the agent knows of a running job's ports: (host, container) pairs as it published them (the
    spec's list and the `ports: N` picks)."""

    ports: list[tuple[int, int]]

    def address(self, port: int) -> tuple[str, int] | None:
        """Where the job serves `port` (as the workflow names it), or None if it declares no such port."""
        for host, container in self.ports:
            if container == port:
                return LOOPBACK, host or container
        return None


@dataclass
class _Open:
    task: asyncio.Task[None]
    job_id: str
    closing: asyncio.Future[str]  # set to a reason: the relay ends and tells the coordinator why


@dataclass
class Tunnels:
    stub: agent_pb2_grpc.AgentServiceStub
    metadata: Callable[[], list[tuple[str, str]]]
    job_ports: Callable[[str], JobPorts | None]  # None: not a job this agent runs now
    _open: dict[str, _Open] = field(default_factory=dict)

    def open(self, order: agent_pb2.OpenTunnel) -> None:
        if order.tunnel_id in self._open:
            return
        closing: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._serve(order, closing), name=f"tunnel-{order.job_id}-{order.port}")
        self._open[order.tunnel_id] = _Open(task, order.job_id, closing)
        task.add_done_callback(lambda _t: self._open.pop(order.tunnel_id, None))

    def job_ended(self, job_id: str, why: str) -> None:
        """Closes the job's tunnels; each tells the CLI `why`."""
        for t in list(self._open.values()):
            if t.job_id == job_id and not t.closing.done():
                t.closing.set_result(why)

    async def close(self) -> None:
        tasks = [t.task for t in self._open.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _where(self, order: agent_pb2.OpenTunnel) -> tuple[str, int] | str:
        ports = self.job_ports(order.job_id)
        if ports is None:
            return f"job {order.job_id} is not running on this agent"
        address = ports.address(order.port)
        if address is None:
            declared = ", ".join(str(c) for _, c in ports.ports) or "none"
            log.warning("refused a tunnel to port %d of job %s: it declares %s", order.port, order.job_id, declared)
            return f"port {order.port} is not one of the job's ports ({declared})"
        return address

    async def _serve(self, order: agent_pb2.OpenTunnel, closing: asyncio.Future[str]) -> None:
        call = self.stub.Tunnel(metadata=self.metadata())
        try:
            where = self._where(order)
            if isinstance(where, str):
                await _refuse(call, order.tunnel_id, where)
                return
            host, port = where
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, limit=FRAME_BYTES), CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError) as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
                await _refuse(
                    call,
                    order.tunnel_id,
                    f"nothing answers on port {order.port} inside the job ({reason}): is the job's server"
                    f" listening on it yet?",
                )
                return
            await call.write(common_pb2.TunnelFrame(tunnel_id=order.tunnel_id))
            await relay(call, reader, writer, closing)
            if not closing.done():
                await call.code()  # the coordinator ends the stream once both ways are closed
        except (grpc.aio.AioRpcError, TunnelError, OSError) as e:
            log.info("tunnel to port %d of job %s closed: %s", order.port, order.job_id, e)
        except Exception:  # one tunnel must never take the agent's session with it
            log.exception("tunnel to port %d of job %s failed", order.port, order.job_id)
        finally:
            call.cancel()


async def _refuse(call: grpc.aio.StreamStreamCall, tunnel_id: str, why: str) -> None:
    await call.write(common_pb2.TunnelFrame(tunnel_id=tunnel_id, error=why))
    await call.done_writing()
    await call.code()
