"""One connected agent's stream: its hello, the messages it sends, the work pushed down to it.

The one use case here that keeps dstack.v1 messages (tests/unit/test_app_layer.py lists it): the
stream relays the agent protocol, which has one front end (gRPC) and whose messages the engine reads
and answers as they are (coordinator/engine.py: on_hello, on_message; hub.py queues them per agent).
Its contents are converted to domain values where they are stored (convert.log_batches_from_proto,
convert.job_updates_from_proto). The agent's unary calls (artifacts, grants, code) are plain:
coordinator/app/agent_link.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from dstack.coordinator.app.core import Core
from dstack.coordinator.hub import AgentConnection
from dstack.protos.v1 import agent_pb2

log = logging.getLogger("dstack.coordinator")


class Session:
    """One agent's stream: `start` with its hello, `receive` what it sends, `outgoing` what to send
    it, `close` when the stream ends."""

    def __init__(self, core: Core, agent_id: str) -> None:
        self.core = core
        self.agent_id = agent_id
        self._conn: AgentConnection | None = None

    async def start(self, hello: agent_pb2.AgentMessage) -> agent_pb2.CoordinatorMessage:
        self._conn = self.core.engine.hub.attach(self.agent_id)
        log.info("agent %s connected", self.agent_id)
        return await self.core.engine.on_hello(self.agent_id, hello)

    async def receive(self, msg: agent_pb2.AgentMessage) -> None:
        reply = await self.core.engine.on_message(self.agent_id, msg)
        if reply is not None and self._conn is not None:
            self._conn.send(reply)

    async def outgoing(self) -> AsyncIterator[agent_pb2.CoordinatorMessage]:
        assert self._conn is not None, "start the session first"
        while (msg := await self._conn.next_batch()) is not None:
            yield msg

    def end_input(self) -> None:
        """The agent's side of the stream ended: so does ours."""
        if self._conn is not None:
            self._conn.close()

    def close(self) -> None:
        if self._conn is not None:
            self.core.engine.hub.detach(self._conn)
            log.info("agent %s disconnected", self.agent_id)
