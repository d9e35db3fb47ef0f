"""AgentService: what agents call. Translates messages to and from coordinator/app calls; the
agent is authenticated by coordinator/auth.py, and domain errors become status codes in rpc.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from dstack.coordinator.app import agent_link, agent_stream, agents
from dstack.coordinator.app.core import Core
from dstack.coordinator.auth import agent_id, join_token_id
from dstack.coordinator.convert import (
    completed_uploads_from_proto,
    file_sizes_from_proto,
    inventory_from_proto,
    upload_grant_to_proto,
)
from dstack.coordinator.errors import CoordinatorError
from dstack.coordinator.services.rpc import data_of, first_message, status_for, streaming, unary
from dstack.coordinator.services.tunnel import agent_tunnel
from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, client_pb2, common_pb2

Ctx: TypeAlias = Any  # grpc.aio.ServicerContext: grpc ships no type information
log = logging.getLogger("dstack.coordinator")


INBOX_MESSAGES = 16  # an agent's messages read but not handled yet, at most


def _beat_only(msg: agent_pb2.AgentMessage) -> bool:
    """A heartbeat with nothing to store: no inventory, no lines, no updates (its seq is acknowledged)."""
    return [f.name for f, _ in msg.ListFields()] == ["heartbeat"] and not msg.heartbeat.HasField("inventory")


class AgentService(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    @unary
    async def Register(self, request: agent_pb2.RegisterRequest, context: Ctx) -> agent_pb2.RegisterResponse:
        reg = await agents.register(self.core, request.name, inventory_from_proto(request.inventory), join_token_id())
        return agent_pb2.RegisterResponse(agent_id=reg.agent_id, agent_token=reg.agent_token)

    async def Connect(
        self, request_iterator: AsyncIterator[agent_pb2.AgentMessage], context: Ctx
    ) -> AsyncIterator[agent_pb2.CoordinatorMessage]:
        me = agent_id()
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("hello"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a hello")
            return
        session = agent_stream.Session(self.core, me)

        # Reading and handling are two tasks: a message renews the agent's lease as it is read, while
        # the one before it may still wait for the database (behind a scheduling pass): a heartbeat is
        # never read late because a log batch ahead of it is being stored. The inbox is bounded (the
        # agent's own window bounds it too): a stalled store slows the agent's logs, not our memory.
        inbox: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue(maxsize=INBOX_MESSAGES)
        handling = False  # the handler took a message from the inbox and is not done with it

        async def read() -> None:
            try:
                async for msg in request_iterator:
                    if session.heard() and _beat_only(msg):
                        session.ack_beat(msg.heartbeat.seq)  # renewed in memory: in force at once
                        continue  # nothing else in it
                    if not handling and inbox.empty() and session.idle() and session.receive_now(msg):
                        # Nothing of this stream's before it waits: handled without the handler's task (a
                        # message of updates alone; Session.receive_now). The handler, and this path, wait
                        # for its answer before the next message (`settled`): the agent's order is kept.
                        continue
                    if inbox.full():
                        # We stop reading: what the agent sends next (its heartbeats too) waits in the
                        # transport until the handler, behind the database, makes room. Our backlog, not
                        # the agent's silence: its lease does not run out meanwhile.
                        with session.unread():
                            await inbox.put(msg)
                    else:
                        inbox.put_nowait(msg)
            except (asyncio.CancelledError, grpc.aio.AioRpcError):
                pass
            except Exception:
                log.exception("agent %s stream failed", me)
            finally:
                await inbox.put(None)

        async def handle() -> None:
            nonlocal handling
            try:
                while (msg := await inbox.get()) is not None:
                    handling = True
                    await session.settled()  # a message the direct path took before this one is answered
                    if session.ended:  # ...and failed: nothing behind it is applied on this stream
                        break
                    await session.receive_stored(msg)  # again while the store's disk refuses writes
                    handling = False
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("agent %s stream failed", me)
            finally:
                session.end_input()

        tasks: list[asyncio.Task[None]] = []
        try:
            try:
                ack = await session.start(first)
            except CoordinatorError as e:  # removed since the stream was authenticated
                await context.abort(status_for(e) or grpc.StatusCode.UNKNOWN, str(e))
                return
            yield ack
            tasks = [asyncio.create_task(read()), asyncio.create_task(handle())]
            async for msg in session.outgoing():
                yield msg
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            session.close()

    async def Tunnel(  # type: ignore[override]  # grpc.aio also takes a handler that writes via its context
        self, request_iterator: AsyncIterator[common_pb2.TunnelFrame], context: Ctx
    ) -> None:
        await agent_tunnel(self.core, context)  # reads and writes through the context (services/tunnel.py)

    @streaming
    async def GetCode(self, request: agent_pb2.GetCodeRequest, context: Ctx) -> AsyncIterator[client_pb2.DataChunk]:
        async for chunk in agent_link.read_code(self.core, agent_id(), request.hash):
            yield client_pb2.DataChunk(data=chunk)

    @unary
    async def UploadArtifact(
        self, request_iterator: AsyncIterator[agent_pb2.UploadArtifactRequest], context: Ctx
    ) -> agent_pb2.UploadArtifactResponse:
        first = await first_message(request_iterator)
        size, digest = await agent_link.upload_artifact(
            self.core, agent_id(), first.job_id, first.path, data_of(first, request_iterator)
        )
        return agent_pb2.UploadArtifactResponse(size=size, sha256=digest)

    @unary
    async def CommitArtifacts(
        self, request: agent_pb2.CommitArtifactsRequest, context: Ctx
    ) -> agent_pb2.CommitArtifactsResponse:
        files = [(f.path, f.size, f.sha256) for f in request.files]
        completed = completed_uploads_from_proto(request.completed)
        await agent_link.commit_artifacts(self.core, agent_id(), request.job_id, files, completed)
        return agent_pb2.CommitArtifactsResponse()

    @unary
    async def GrantCode(self, request: agent_pb2.GetCodeRequest, context: Ctx) -> agent_pb2.GrantCodeResponse:
        return agent_pb2.GrantCodeResponse(url=await agent_link.code_download_url(self.core, agent_id(), request.hash))

    @unary
    async def GrantUploads(
        self, request: agent_pb2.GrantUploadsRequest, context: Ctx
    ) -> agent_pb2.GrantUploadsResponse:
        files = file_sizes_from_proto(request.files)
        grants = await agent_link.grant_uploads(self.core, agent_id(), request.job_id, files)
        if grants is None:
            return agent_pb2.GrantUploadsResponse(stream=True)
        return agent_pb2.GrantUploadsResponse(grants=[upload_grant_to_proto(g) for g in grants])

    @unary
    async def GrantDownloads(
        self, request: agent_pb2.GrantDownloadsRequest, context: Ctx
    ) -> agent_pb2.GrantDownloadsResponse:
        files = [(f.run_name, f.job_name, f.path) for f in request.files]
        urls = await agent_link.input_download_urls(self.core, agent_id(), files)
        if urls is None:
            return agent_pb2.GrantDownloadsResponse(stream=True)
        return agent_pb2.GrantDownloadsResponse(urls=urls)

    @streaming
    async def DownloadArtifact(
        self, request: client_pb2.DownloadArtifactRequest, context: Ctx
    ) -> AsyncIterator[client_pb2.DataChunk]:
        async for chunk in agent_link.download_input(
            self.core, agent_id(), request.run_name, request.job_name, request.path
        ):
            yield client_pb2.DataChunk(data=chunk)
