"""The live agent streams: one outbound queue per connected agent."""

from __future__ import annotations

import asyncio

from dstack.protos.v1 import agent_pb2


class AgentConnection:
    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self.queue: asyncio.Queue[agent_pb2.CoordinatorMessage | None] = asyncio.Queue()
        self.closed = False
        # Acknowledgements held back to leave with this agent's next message (`hold`), and the number of
        # scheduling passes begun when the first of them was held (AgentHub.release_held).
        self.held: agent_pb2.CoordinatorMessage | None = None
        self.held_at = 0

    def send(self, msg: agent_pb2.CoordinatorMessage) -> None:
        """Queues `msg` for the stream's writer; what was held (`hold`) goes with it, ahead of it."""
        if self.closed:
            return
        held, self.held = self.held, None
        if held is not None:
            held.MergeFrom(msg)
            msg = held
        self.queue.put_nowait(msg)

    def hold(self, msg: agent_pb2.CoordinatorMessage, passes: int) -> None:
        """Keeps `msg` (acknowledgements alone) to go with the next message sent, not in a write of its own:
        a report that freed capacity is answered by the pass it asked for, so its ack and the agent's next
        assignment leave in one write. The engine sends it alone at the latest after the first pass begun
        after `passes` (Engine.ack_with_pass, AgentHub.release_held)."""
        if self.closed:
            return
        if self.held is None:
            self.held, self.held_at = msg, passes
        else:
            self.held.MergeFrom(msg)

    def release_held(self) -> None:
        """Sends what is held, alone."""
        held, self.held = self.held, None
        if held is not None and not self.closed:
            self.queue.put_nowait(held)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.held = None  # never acknowledged: the agent sends it again on its next stream
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
        self._holding: set[AgentConnection] = set()  # connections that may hold acknowledgements (`hold`)

    def hold(self, conn: AgentConnection, msg: agent_pb2.CoordinatorMessage, passes: int) -> None:
        """`conn.hold`: `msg` goes with the agent's next message, or alone from `release_held`."""
        conn.hold(msg, passes)
        self._holding.add(conn)

    def release_held(self, begun_before: int | None = None) -> None:
        """Sends alone what connections still hold: all of it, or (`begun_before`) what was held before that
        many passes had begun (a pass begun after it has ended: what it placed for those agents was sent)."""
        kept: set[AgentConnection] = set()
        for conn in self._holding:
            if conn.held is None:
                continue  # it went with a message meanwhile, or the stream ended
            if begun_before is not None and conn.held_at >= begun_before:
                kept.add(conn)
            else:
                conn.release_held()
        self._holding = kept

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
