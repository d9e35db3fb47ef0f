"""The live agent streams: one outbound queue per connected agent."""

from __future__ import annotations

import asyncio

from dstack.protos.v1 import agent_pb2


class AgentConnection:
    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self.queue: asyncio.Queue[agent_pb2.CoordinatorMessage | None] = asyncio.Queue()
        self.closed = False

    def send(self, msg: agent_pb2.CoordinatorMessage) -> None:
        if not self.closed:
            self.queue.put_nowait(msg)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put_nowait(None)

    async def next_batch(self) -> agent_pb2.CoordinatorMessage | None:
        """Waits for one message and merges whatever else is queued into it (fewer, larger writes)."""
        first = await self.queue.get()
        if first is None:
            return None
        while not self.queue.empty():
            more = self.queue.get_nowait()
            if more is None:
                self.queue.put_nowait(None)
                break
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
