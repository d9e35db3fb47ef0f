"""AgentService: registration, the long-lived job stream, code and artifact transfer."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from dstack.coordinator.artifacts import Artifacts, artifact_key, check_relative_path, code_key
from dstack.coordinator.engine import Engine
from dstack.coordinator.errors import AlreadyExists, Conflict, Unauthenticated
from dstack.coordinator.services.client import put_from_messages, read_chunks, stream_artifact
from dstack.coordinator.services.rpc import bearer_token, streaming, unary
from dstack.coordinator.store import JobLocation
from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, client_pb2

Ctx: TypeAlias = Any  # grpc.aio.ServicerContext: grpc ships no type information
log = logging.getLogger("dstack.coordinator")


class AgentService(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, engine: Engine, artifacts: Artifacts) -> None:
        self.engine = engine
        self.store = engine.store
        self.db = engine.db
        self.artifacts = artifacts.store
        self.bookkeeping = artifacts

    async def _agent(self, context: Ctx) -> str:
        row = await self.db(self.store.agent_by_token, bearer_token(context))
        if row is None:
            raise Unauthenticated("unknown agent token: register the agent again with the join token")
        return row.id

    async def _own_job(self, agent_id: str, job_id: str) -> JobLocation:
        job = await self.db(self.store.job_location, job_id)
        if job.agent_id != agent_id:
            raise Conflict(f"job {job_id} is not assigned to this agent")
        return job

    @unary
    async def Register(self, request: agent_pb2.RegisterRequest, context: Ctx) -> agent_pb2.RegisterResponse:
        if not hmac.compare_digest(request.join_token.encode(), self.engine.config.join_token.encode()):
            raise Unauthenticated("invalid join token")
        token = secrets.token_urlsafe(32)
        name = request.name or request.inventory.hostname or "agent"
        try:
            agent_id = await self.db(self.store.register_agent, name, token, request.inventory.SerializeToString())
        except AlreadyExists as e:
            log.warning("registration refused (host %s): %s", request.inventory.hostname or "?", e)
            raise
        log.info("agent %s registered as %s", name, agent_id)
        return agent_pb2.RegisterResponse(agent_id=agent_id, agent_token=token)

    async def Connect(
        self, request_iterator: AsyncIterator[agent_pb2.AgentMessage], context: Ctx
    ) -> AsyncIterator[agent_pb2.CoordinatorMessage]:
        try:
            agent_id = await self._agent(context)
        except Unauthenticated as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
            return
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("hello"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a hello")
            return
        conn = self.engine.hub.attach(agent_id)
        log.info("agent %s connected", agent_id)

        async def read() -> None:
            try:
                async for msg in request_iterator:
                    reply = await self.engine.on_message(agent_id, msg)
                    if reply is not None:
                        conn.send(reply)
            except (asyncio.CancelledError, grpc.aio.AioRpcError):
                pass
            except Exception:
                log.exception("agent %s stream failed", agent_id)
            finally:
                conn.close()

        reader: asyncio.Task[None] | None = None
        try:
            yield await self.engine.on_hello(agent_id, first)
            reader = asyncio.create_task(read())
            while (msg := await conn.next_batch()) is not None:
                yield msg
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            self.engine.hub.detach(conn)
            log.info("agent %s disconnected", agent_id)

    @streaming
    async def GetCode(self, request: agent_pb2.GetCodeRequest, context: Ctx) -> AsyncIterator[client_pb2.DataChunk]:
        await self._agent(context)
        async for chunk in read_chunks(self.artifacts, code_key(request.hash)):
            yield client_pb2.DataChunk(data=chunk)

    @unary
    async def UploadArtifact(
        self, request_iterator: AsyncIterator[agent_pb2.UploadArtifactRequest], context: Ctx
    ) -> agent_pb2.UploadArtifactResponse:
        agent_id = await self._agent(context)
        first = await anext(aiter(request_iterator))
        job = await self._own_job(agent_id, first.job_id)
        key = artifact_key(job.run_name, job.job_name, check_relative_path(first.path))
        size, digest = await put_from_messages(self.artifacts, key, first, request_iterator)
        return agent_pb2.UploadArtifactResponse(size=size, sha256=digest)

    @unary
    async def CommitArtifacts(
        self, request: agent_pb2.CommitArtifactsRequest, context: Ctx
    ) -> agent_pb2.CommitArtifactsResponse:
        agent_id = await self._agent(context)
        job = await self._own_job(agent_id, request.job_id)
        files = [(check_relative_path(f.path), f.size, f.sha256) for f in request.files]
        await self.bookkeeping.commit(job.run_name, job.job_name, files, request.completed)
        await self.db(self.store.save_artifacts, request.job_id, files)
        return agent_pb2.CommitArtifactsResponse()

    @unary
    async def GrantCode(self, request: agent_pb2.GetCodeRequest, context: Ctx) -> agent_pb2.GrantCodeResponse:
        await self._agent(context)
        return agent_pb2.GrantCodeResponse(url=await self.bookkeeping.code_download_url(request.hash))

    @unary
    async def GrantUploads(
        self, request: agent_pb2.GrantUploadsRequest, context: Ctx
    ) -> agent_pb2.GrantUploadsResponse:
        agent_id = await self._agent(context)
        job = await self._own_job(agent_id, request.job_id)
        if not self.bookkeeping.presigns:
            return agent_pb2.GrantUploadsResponse(stream=True)
        grants = await self.bookkeeping.grant_uploads(job.run_name, job.job_name, request.files)
        return agent_pb2.GrantUploadsResponse(grants=grants)

    @unary
    async def GrantDownloads(
        self, request: agent_pb2.GrantDownloadsRequest, context: Ctx
    ) -> agent_pb2.GrantDownloadsResponse:
        await self._agent(context)
        if not self.bookkeeping.presigns:
            return agent_pb2.GrantDownloadsResponse(stream=True)
        keys = await self.db(self._recorded_keys, list(request.files))
        return agent_pb2.GrantDownloadsResponse(urls=await self.bookkeeping.download_urls(keys))

    def _recorded_keys(self, files: list[client_pb2.DownloadArtifactRequest]) -> list[str]:
        """Store keys of recorded artifacts only (NOT_FOUND otherwise): no URL for an unknown object."""
        keys = []
        runs: dict[str, str] = {}
        for f in files:
            if f.run_name not in runs:
                runs[f.run_name] = self.store.run_by_name(f.run_name).id
            self.store.artifact(runs[f.run_name], f.job_name, f.path)
            keys.append(artifact_key(f.run_name, f.job_name, f.path))
        return keys

    @streaming
    async def DownloadArtifact(
        self, request: client_pb2.DownloadArtifactRequest, context: Ctx
    ) -> AsyncIterator[client_pb2.DataChunk]:
        await self._agent(context)
        async for chunk in stream_artifact(self.engine, self.artifacts, request):
            yield chunk
