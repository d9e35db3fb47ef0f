"""The live agent streams: one outbound queue per connected agent."""

from __future__ import annotations

import asyncio

from dstack.protos.v1 import agent_pb2


class AgentConnection:
    """What is to be sent to one agent's stream, in order; its writer (`next_batch`) takes it all at once.

    A list and one waiter, not an asyncio.Queue: two messages go down per job at a deep queue's drain (its
    acks, its next assignment), and a queue's bookkeeping (its getters, its unfinished count, its event) was
    a noticeable share of the event loop's work per job (bench.drain)."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self.closed = False
        self._out: list[agent_pb2.CoordinatorMessage] = []
        self._waiter: asyncio.Future[None] | None = None  # the writer waiting for something to send

    def send(self, msg: agent_pb2.CoordinatorMessage) -> None:
        if not self.closed:
            self._out.append(msg)
            self._wake()

    def close(self) -> None:
        """No more sends: the writer sends what is queued, then ends."""
        if not self.closed:
            self.closed = True
            self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_batch(self) -> agent_pb2.CoordinatorMessage | None:
        """Waits for one message and merges whatever else is queued into it (fewer, larger writes); None
        once the connection is closed and everything before was taken."""
        while not self._out:
            if self.closed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        out, self._out = self._out, []
        first = out[0]
        for more in out[1:]:
            first.MergeFrom(more)
        return first


class AgentHub:
    def __init__(self) -> None:
        self._conns: dict[str, AgentConnection] = {}

    def attach(self, agent_id: str) -> AgentConnection:
        old = self._conns.get(agent_id)
        if old is not None:
            old.close()  # a newer stream from the same agent wins
        conn = AgentConnection(agent_id)
        self._conns[agent_id] = conn
        return conn

    def detach(self, conn: AgentConnection) -> None:
        conn.close()
        if self._conns.get(conn.agent_id) is conn:
            del self._conns[conn.agent_id]

    def drop(self, agent_id: str) -> None:
        conn = self._conns.pop(agent_id, None)
        if conn is not None:
            conn.close()

    def send(self, agent_id: str, msg: agent_pb2.CoordinatorMessage) -> bool:
        conn = self._conns.get(agent_id)
        if conn is None:
            return False  # it gets the message when it reconnects (Hello reconciliation)
        conn.send(msg)
        return True

    def open_tunnel(self, agent_id: str, tunnel_id: str, wire_job_id: str, port: int) -> bool:
        """Asks a connected agent to open a tunnel (docs/tunnels.md); False: it is not connected."""
        order = agent_pb2.OpenTunnel(tunnel_id=tunnel_id, job_id=wire_job_id, port=port)
        return self.send(agent_id, agent_pb2.CoordinatorMessage(open_tunnels=[order]))

    def connected_ids(self) -> set[str]:
        return set(self._conns)

    def close_all(self) -> None:
        for conn in list(self._conns.values()):
            conn.close()
        self._conns.clear()
