"""ClientService: what the CLI calls. Translates messages to and from coordinator/app calls; the
caller is authenticated by coordinator/auth.py, and domain errors become status codes in rpc.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from dstack.coordinator.app import (
    agents,
    artifacts,
    code,
    join_tokens,
    logs,
    records,
    rerun,
    runs,
    secrets,
    tags,
    users,
)
from dstack.coordinator.app.core import Core
from dstack.coordinator.app.ownership import Actor
from dstack.coordinator.auth import user_caller, user_name
from dstack.coordinator.convert import (
    agent_to_proto,
    artifact_file_to_proto,
    code_from_proto,
    completed_uploads_from_proto,
    file_sizes_from_proto,
    job_spec_from_proto,
    run_to_proto,
    upload_grant_to_proto,
)
from dstack.coordinator.errors import CoordinatorError
from dstack.coordinator.model import RunView
from dstack.coordinator.services.rpc import data_of, first_message, hold_stream, unary, write_or_drop
from dstack.coordinator.services.tunnel import client_tunnel
from dstack.protos.v1 import client_pb2, client_pb2_grpc, common_pb2

Ctx: TypeAlias = Any  # grpc.aio.ServicerContext: grpc ships no type information
VERSION = "0.1.0"


class ClientService(client_pb2_grpc.ClientServiceServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    async def Tunnel(  # type: ignore[override]  # grpc.aio also takes a handler that writes via its context
        self, request_iterator: AsyncIterator[common_pb2.TunnelFrame], context: Ctx
    ) -> None:
        await client_tunnel(self.core, context)  # reads and writes through the context (services/tunnel.py)

    @unary
    async def GetInfo(self, request: client_pb2.GetInfoRequest, context: Ctx) -> client_pb2.GetInfoResponse:
        who = user_caller()
        return client_pb2.GetInfoResponse(
            version=VERSION, user=who.name, local_mode=self.core.local_mode, role=who.user_role
        )

    @unary
    async def HasCode(self, request: client_pb2.HasCodeRequest, context: Ctx) -> client_pb2.HasCodeResponse:
        p = await code.has_code(self.core, request.hash)
        return client_pb2.HasCodeResponse(present=p.present, upload_url=p.upload_url)

    @unary
    async def PutCode(
        self, request_iterator: AsyncIterator[client_pb2.PutCodeRequest], context: Ctx
    ) -> client_pb2.PutCodeResponse:
        first = await first_message(request_iterator)
        size = await code.put_code(self.core, first.hash, data_of(first, request_iterator))
        return client_pb2.PutCodeResponse(bytes_received=size)

    @unary
    async def SubmitRun(self, request: client_pb2.SubmitRunRequest, context: Ctx) -> client_pb2.SubmitRunResponse:
        sub = runs.Submission(
            request.workflow,
            [job_spec_from_proto(j) for j in request.jobs],
            code_from_proto(request.code),
            list(request.args),
            request.tag_on_done,
            request.priority,
            request.repository,
            request.resolved_workflow,
        )
        return client_pb2.SubmitRunResponse(run=run_to_proto(await runs.submit(self.core, user_name(), sub, actor())))

    @unary
    async def SubmitRuns(self, request: client_pb2.SubmitRunsRequest, context: Ctx) -> client_pb2.SubmitRunsResponse:
        subs = [
            runs.Submission(
                r.workflow,
                [job_spec_from_proto(j) for j in r.jobs],
                code_from_proto(r.code),
                list(r.args),
                r.tag_on_done,
                r.priority,
                r.repository,
                r.resolved_workflow,
            )
            for r in request.runs
        ]
        resp = client_pb2.SubmitRunsResponse()
        for result in await runs.submit_many(self.core, user_name(), subs, actor()):
            if isinstance(result, CoordinatorError):
                resp.runs.add()
                resp.errors.append(str(result))
            else:
                resp.runs.append(run_to_proto(result))
                resp.errors.append("")
        return resp

    @unary
    async def GetRunRecord(
        self, request: client_pb2.GetRunRecordRequest, context: Ctx
    ) -> client_pb2.GetRunRecordResponse:
        found = await records.run_record(self.core, request.run_name, request.grant_code)
        text = await asyncio.to_thread(json.dumps, found.record, sort_keys=True)
        return client_pb2.GetRunRecordResponse(record_json=text, code_url=found.code_url, diff_url=found.diff_url)

    @unary
    async def RerunRun(self, request: client_pb2.RerunRunRequest, context: Ctx) -> client_pb2.RerunRunResponse:
        done = await rerun.rerun(
            self.core,
            actor(),
            request.run_name,
            request.same_inputs,
            request.pin,
            request.tag_on_done,
            request.priority,
        )
        return client_pb2.RerunRunResponse(run=run_to_proto(done.run), notes=done.notes)

    @unary
    async def DownloadRunCode(  # type: ignore[override]  # writes through its context, to bound a slow reader
        self, request: client_pb2.DownloadRunCodeRequest, context: Ctx
    ) -> None:
        what = f"downloading the code of run {request.run_name}"
        hold_stream(self.core.streams, context, user_name(), what)
        async for chunk in records.read_run_code(self.core, request.run_name, request.diff):
            await write_or_drop(self.core.streams, context, client_pb2.DataChunk(data=chunk), what)

    @unary
    async def GetRun(self, request: client_pb2.GetRunRequest, context: Ctx) -> client_pb2.GetRunResponse:
        # Any user may read any run (auth.py's table): no owner check here, as before.
        return await runs.get_then(self.core, request.name, _run_response)

    @unary
    async def ListRuns(self, request: client_pb2.ListRunsRequest, context: Ctx) -> client_pb2.ListRunsResponse:
        with_finished = request.with_finished and not request.all

        def response(page: runs.RunsListing) -> client_pb2.ListRunsResponse:
            # Built on the reader thread, off the event loop: thousands of runs take a while (about 17 ms
            # per 1000).
            return client_pb2.ListRunsResponse(
                runs=[run_to_proto(r) for r in page.runs],
                next_page_token=page.next_token,
                finished=[run_to_proto(r) for r in page.finished],
                finished_sent=with_finished,
            )

        return await runs.list_runs_page(
            self.core, request.all, request.limit, request.page_token, response, with_finished
        )

    @unary
    async def StopRun(self, request: client_pb2.StopRunRequest, context: Ctx) -> client_pb2.StopRunResponse:
        return client_pb2.StopRunResponse(run=run_to_proto(await runs.stop(self.core, actor(), request.name)))

    @unary
    async def PreemptRun(self, request: client_pb2.PreemptRunRequest, context: Ctx) -> client_pb2.PreemptRunResponse:
        n, run = await runs.preempt(self.core, request.name)
        return client_pb2.PreemptRunResponse(preempted=n, run=run_to_proto(run))

    @unary
    async def DeleteRun(self, request: client_pb2.DeleteRunRequest, context: Ctx) -> client_pb2.DeleteRunResponse:
        return client_pb2.DeleteRunResponse(objects_deleted=await runs.delete(self.core, actor(), request.name))

    @unary
    async def StreamLogs(  # type: ignore[override]  # writes through its context, to bound a slow reader
        self, request: client_pb2.StreamLogsRequest, context: Ctx
    ) -> None:
        what = f"{'following' if request.follow else 'reading'} the logs of run {request.run_name}"
        hold_stream(self.core.streams, context, user_name(), what)
        after = {c.job_name: c.seq for c in request.after}
        # A user removed (or whose token is rotated) while following: the stream ends on its next message.
        signed_in = users.SignedIn(self.core, actor())
        async for chunk in logs.stream_logs(self.core, request.run_name, request.follow, after, request.blocks):
            await signed_in.check()
            resp = client_pb2.StreamLogsResponse(
                finished_run=None if chunk.finished_run is None else run_to_proto(chunk.finished_run),
                cursor=[client_pb2.LogCursor(job_name=k, seq=v) for k, v in chunk.cursor.items()],
            )
            for j in chunk.jobs:  # the lines as stored, serialized: no object per line
                resp.jobs.add(job_name=j.job_name).MergeFromString(j.body)
            await write_or_drop(self.core.streams, context, resp, what)

    @unary
    async def ListArtifacts(
        self, request: client_pb2.ListArtifactsRequest, context: Ctx
    ) -> client_pb2.ListArtifactsResponse:
        listing = await artifacts.list_artifacts(self.core, request.run_name, request.with_urls)
        return client_pb2.ListArtifactsResponse(
            files=[artifact_file_to_proto(f) for f in listing.files],
            urls=listing.urls,
        )

    @unary
    async def DownloadArtifact(  # type: ignore[override]  # writes through its context, to bound a slow reader
        self, request: client_pb2.DownloadArtifactRequest, context: Ctx
    ) -> None:
        what = f"downloading {request.path} of run {request.run_name}"
        hold_stream(self.core.streams, context, user_name(), what)
        chunks = artifacts.download(self.core, request.run_name, request.job_name, request.path)
        try:
            async for chunk in chunks:
                await write_or_drop(self.core.streams, context, client_pb2.DataChunk(data=chunk), what)
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]  # the store's stream, at once

    @unary
    async def CreateUpload(
        self, request: client_pb2.CreateUploadRequest, context: Ctx
    ) -> client_pb2.CreateUploadResponse:
        files = file_sizes_from_proto(request.files)
        up = await artifacts.create_upload(
            self.core, user_name(), request.workflow, request.tag, files, request.repository
        )
        grants = [upload_grant_to_proto(g) for g in up.grants]
        return client_pb2.CreateUploadResponse(run_name=up.run_name, stream=up.stream, grants=grants)

    @unary
    async def PutArtifact(
        self, request_iterator: AsyncIterator[client_pb2.PutArtifactRequest], context: Ctx
    ) -> client_pb2.PutArtifactResponse:
        first = await first_message(request_iterator)
        size, digest = await artifacts.put_upload_file(
            self.core, actor(), first.run_name, first.path, data_of(first, request_iterator)
        )
        return client_pb2.PutArtifactResponse(size=size, sha256=digest)

    @unary
    async def CommitUpload(
        self, request: client_pb2.CommitUploadRequest, context: Ctx
    ) -> client_pb2.CommitUploadResponse:
        files = [(f.path, f.size, f.sha256) for f in request.files]
        completed = completed_uploads_from_proto(request.completed)
        run = await artifacts.commit_upload(self.core, actor(), request.run_name, files, completed)
        return client_pb2.CommitUploadResponse(run=run_to_proto(run))

    @unary
    async def ListAgents(self, request: client_pb2.ListAgentsRequest, context: Ctx) -> client_pb2.ListAgentsResponse:
        return client_pb2.ListAgentsResponse(agents=[agent_to_proto(a) for a in await agents.list_agents(self.core)])

    @unary
    async def AddTag(self, request: client_pb2.AddTagRequest, context: Ctx) -> client_pb2.AddTagResponse:
        return client_pb2.AddTagResponse(
            tag=tag_to_proto(await tags.add(self.core, actor(), request.tag, request.run_name))
        )

    @unary
    async def ListTags(self, request: client_pb2.ListTagsRequest, context: Ctx) -> client_pb2.ListTagsResponse:
        found = await tags.list_tags(self.core, user_name(), request.repository, request.all)
        return client_pb2.ListTagsResponse(tags=[tag_to_proto(t) for t in found])

    @unary
    async def DeleteTag(self, request: client_pb2.DeleteTagRequest, context: Ctx) -> client_pb2.DeleteTagResponse:
        await tags.delete(self.core, actor(), request.tag, request.repository)
        return client_pb2.DeleteTagResponse()

    @unary
    async def GetTag(self, request: client_pb2.GetTagRequest, context: Ctx) -> client_pb2.GetTagResponse:
        tag = await tags.get(self.core, user_name(), request.repository, request.ref)
        return client_pb2.GetTagResponse(tag=tag_to_proto(tag))

    @unary
    async def AddSecret(self, request: client_pb2.AddSecretRequest, context: Ctx) -> client_pb2.AddSecretResponse:
        secret = await secrets.add(self.core, actor(), request.name, request.value, request.personal)
        return client_pb2.AddSecretResponse(secret=secret_to_proto(secret))

    @unary
    async def ListSecrets(self, request: client_pb2.ListSecretsRequest, context: Ctx) -> client_pb2.ListSecretsResponse:
        return client_pb2.ListSecretsResponse(
            secrets=[secret_to_proto(s) for s in await secrets.list_secrets(self.core, actor())]
        )

    @unary
    async def DeleteSecret(
        self, request: client_pb2.DeleteSecretRequest, context: Ctx
    ) -> client_pb2.DeleteSecretResponse:
        await secrets.delete(self.core, actor(), request.name, request.personal)
        return client_pb2.DeleteSecretResponse()

    @unary
    async def SetUserLimits(
        self, request: client_pb2.SetUserLimitsRequest, context: Ctx
    ) -> client_pb2.SetUserLimitsResponse:
        row = await users.set_limits(
            self.core,
            user_name(),
            request.name,
            request.share if request.HasField("share") else None,
            request.max_gpus if request.HasField("max_gpus") else None,
            request.max_running if request.HasField("max_running") else None,
        )
        return client_pb2.SetUserLimitsResponse(
            user=client_pb2.UserLimits(
                name=row.name, share=row.share, max_gpus=row.max_gpus, max_running=row.max_running
            )
        )

    # ---- enrolment (admin only) ----------------------------------------------------------------
    @unary
    async def CreateJoinToken(
        self, request: client_pb2.CreateJoinTokenRequest, context: Ctx
    ) -> client_pb2.CreateJoinTokenResponse:
        new = await join_tokens.create(self.core, request.ttl_s, request.max_uses, user_name())
        return client_pb2.CreateJoinTokenResponse(join_token=join_token_to_proto(new.row), token=new.token)

    @unary
    async def ListJoinTokens(
        self, request: client_pb2.ListJoinTokensRequest, context: Ctx
    ) -> client_pb2.ListJoinTokensResponse:
        rows = await join_tokens.list_tokens(self.core)
        return client_pb2.ListJoinTokensResponse(join_tokens=[join_token_to_proto(r) for r in rows])

    @unary
    async def RevokeJoinToken(
        self, request: client_pb2.RevokeJoinTokenRequest, context: Ctx
    ) -> client_pb2.RevokeJoinTokenResponse:
        row = await join_tokens.revoke(self.core, request.id, user_name())
        return client_pb2.RevokeJoinTokenResponse(join_token=join_token_to_proto(row))

    @unary
    async def RemoveAgent(self, request: client_pb2.RemoveAgentRequest, context: Ctx) -> client_pb2.RemoveAgentResponse:
        failed = await agents.remove(self.core, request.name, user_name())
        return client_pb2.RemoveAgentResponse(failed_jobs=failed)

    @unary
    async def ApproveAgent(
        self, request: client_pb2.ApproveAgentRequest, context: Ctx
    ) -> client_pb2.ApproveAgentResponse:
        await agents.approve(self.core, request.name, user_name())
        return client_pb2.ApproveAgentResponse()

    # ---- users (admin only, but listing) -------------------------------------------------------
    @unary
    async def AddUser(self, request: client_pb2.AddUserRequest, context: Ctx) -> client_pb2.AddUserResponse:
        new = await users.add(self.core, request.name, request.role, user_name())
        return client_pb2.AddUserResponse(user=user_to_proto(new.user), token=new.token)

    @unary
    async def ListUsers(self, request: client_pb2.ListUsersRequest, context: Ctx) -> client_pb2.ListUsersResponse:
        return client_pb2.ListUsersResponse(users=[user_to_proto(u) for u in await users.list_users(self.core)])

    @unary
    async def RemoveUser(self, request: client_pb2.RemoveUserRequest, context: Ctx) -> client_pb2.RemoveUserResponse:
        await users.remove(self.core, request.name, user_name())
        return client_pb2.RemoveUserResponse()

    @unary
    async def RotateUserToken(
        self, request: client_pb2.RotateUserTokenRequest, context: Ctx
    ) -> client_pb2.RotateUserTokenResponse:
        new = await users.rotate(self.core, request.name, actor())
        return client_pb2.RotateUserTokenResponse(user=user_to_proto(new.user), token=new.token)


def _run_response(run: RunView) -> client_pb2.GetRunResponse:
    # On the reader thread: one run with its jobs takes a few tens of microseconds to convert.
    return client_pb2.GetRunResponse(run=run_to_proto(run))


def actor() -> Actor:
    """The calling user, for the use cases' ownership checks."""
    who = user_caller()
    return Actor(who.name, who.user_role, who.token_hash)


def user_to_proto(u: users.User) -> client_pb2.User:
    return client_pb2.User(name=u.name, role=u.role, created_at_ns=u.created_at, last_seen_at_ns=u.last_seen_at)


def join_token_to_proto(r: join_tokens.JoinToken) -> client_pb2.JoinToken:
    return client_pb2.JoinToken(
        id=r.id,
        created_at_ns=r.created_at,
        expires_at_ns=r.expires_at,
        uses=r.uses,
        max_uses=r.max_uses,
        revoked_at_ns=r.revoked_at,
    )


def secret_to_proto(s: secrets.Secret) -> client_pb2.Secret:
    return client_pb2.Secret(
        name=s.name, created_at_ns=s.created_at_ns, updated_at_ns=s.updated_at_ns, personal=s.personal
    )


def tag_to_proto(t: tags.Tag) -> client_pb2.Tag:
    return client_pb2.Tag(
        name=t.name, run_name=t.run_name, workflow=t.workflow, created_at_ns=t.created_at_ns, repository=t.repository
    )
