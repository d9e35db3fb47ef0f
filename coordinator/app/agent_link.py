"""What a connected agent does: its session (hello, messages, work pushed down) and its jobs' files."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from dstack.coordinator.app.artifacts import FileEntry
from dstack.coordinator.app.core import Core
from dstack.coordinator.app.transfer import put_from_stream
from dstack.coordinator.artifacts import artifact_key, check_relative_path
from dstack.coordinator.errors import Conflict
from dstack.coordinator.hub import AgentConnection
from dstack.protos.v1 import agent_pb2, common_pb2

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


async def own_job(core: Core, agent_id: str, job_id: str) -> Any:
    job = await core.db(core.store.job_location, job_id)
    if job.agent_id != agent_id:
        raise Conflict(f"job {job_id} is not assigned to this agent")
    return job


async def upload_artifact(
    core: Core, agent_id: str, job_id: str, path: str, chunks: AsyncIterator[bytes]
) -> tuple[int, str]:
    """One artifact file of the agent's job, streamed through the coordinator; returns size and sha256."""
    job = await own_job(core, agent_id, job_id)
    key = artifact_key(job.run_name, job.job_name, check_relative_path(path))
    return await put_from_stream(core.objects, key, chunks)


async def commit_artifacts(
    core: Core,
    agent_id: str,
    job_id: str,
    files: Sequence[FileEntry],
    completed: Sequence[common_pb2.CompletedUpload],
) -> None:
    job = await own_job(core, agent_id, job_id)
    checked = [(check_relative_path(p), size, sha) for p, size, sha in files]
    await core.artifacts.commit(job.run_name, job.job_name, checked, completed)
    await core.db(core.store.save_artifacts, job_id, checked)


async def grant_uploads(
    core: Core, agent_id: str, job_id: str, files: Sequence[common_pb2.FileSize]
) -> list[common_pb2.UploadGrant] | None:
    """Presigned upload grants for the agent's job, or None: the store cannot presign (stream them)."""
    job = await own_job(core, agent_id, job_id)
    if not core.artifacts.presigns:
        return None
    return await core.artifacts.grant_uploads(job.run_name, job.job_name, files)
