"""ClientService: what the CLI calls. Thin: authenticate, validate, delegate to the store/engine."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import queue
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeAlias

from dstack.coordinator.artifacts import Artifacts, artifact_key, check_relative_path, code_key, logs_key
from dstack.coordinator.convert import inventory_from_bytes, log_line_to_proto, run_to_proto
from dstack.coordinator.engine import Engine
from dstack.coordinator.errors import InvalidRequest
from dstack.coordinator.retention import read_log_archive
from dstack.coordinator.secrets import check_secret_name
from dstack.coordinator.services.rpc import authenticate, streaming, unary
from dstack.coordinator.store import CreatedRun, NewJob, SecretRow, TagRow
from dstack.coordinator.templates import with_run_name
from dstack.protos.v1 import client_pb2, client_pb2_grpc, common_pb2
from dstack.storage import ArtifactStore, StoreError

Ctx: TypeAlias = Any  # grpc.aio.ServicerContext: grpc ships no type information
VERSION = "0.1.0"
CHUNK = 1 << 20
LOG_BATCH = 5000
LOG_BATCH_BYTES = 4 << 20
TOKEN_CACHE_S = 30.0


async def put_from_stream(
    store: ArtifactStore, key: str, chunks: AsyncIterator[bytes], expected_sha256: str = ""
) -> tuple[int, str]:
    """Streams async chunks into the (blocking) store on a worker thread; returns size and sha256.

    With `expected_sha256`, a mismatch aborts the write, so a corrupted object is never visible."""
    q: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=8)
    digest = hashlib.sha256()

    def gen() -> Iterator[bytes]:
        while (chunk := q.get()) is not None:
            if isinstance(chunk, BaseException):
                raise StoreError("the upload was interrupted") from chunk  # nothing is committed
            digest.update(chunk)
            yield chunk
        if expected_sha256 and digest.hexdigest() != expected_sha256:
            raise InvalidRequest(f"upload corrupted: expected sha256 {expected_sha256}, got {digest.hexdigest()}")

    writer = asyncio.get_running_loop().run_in_executor(None, store.put_stream, key, gen())

    async def feed(item: bytes | BaseException | None) -> bool:
        while not writer.done():
            try:
                q.put_nowait(item)
                return True
            except queue.Full:
                await asyncio.sleep(0.001)
        return False

    try:
        async for chunk in chunks:
            if not await feed(chunk):
                break
    except BaseException as e:  # the sender went away or cancelled: abort the write
        await asyncio.shield(feed(e))
        with contextlib.suppress(Exception):
            await writer
        raise
    await feed(None)
    size = await writer
    return size, digest.hexdigest()


async def put_from_messages(store: ArtifactStore, key: str, first: Any, rest: AsyncIterator[Any]) -> tuple[int, str]:
    """A client-streamed upload (messages with a `data` field, the first already read) into the store."""

    async def chunks() -> AsyncIterator[bytes]:
        yield first.data
        async for msg in rest:
            yield msg.data

    return await put_from_stream(store, key, chunks())


async def stream_artifact(
    engine: Engine, artifacts: ArtifactStore, request: client_pb2.DownloadArtifactRequest
) -> AsyncIterator[client_pb2.DataChunk]:
    """One recorded artifact file of a run's job, in chunks (for users and for agents' job inputs)."""
    run = await engine.db(engine.store.run_by_name, request.run_name)
    await engine.db(engine.store.artifact, run.id, request.job_name, request.path)  # NOT_FOUND if not recorded
    async for chunk in read_chunks(artifacts, artifact_key(run.name, request.job_name, request.path)):
        yield client_pb2.DataChunk(data=chunk)


async def read_chunks(store: ArtifactStore, key: str) -> AsyncIterator[bytes]:
    f = await asyncio.to_thread(store.open_read, key)
    try:
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            yield chunk
    finally:
        f.close()


class ClientService(client_pb2_grpc.ClientServiceServicer):
    def __init__(self, engine: Engine, artifacts: Artifacts) -> None:
        self.engine = engine
        self.store = engine.store
        self.db = engine.db
        self.artifacts = artifacts.store
        self.bookkeeping = artifacts
        self._tokens: dict[str, tuple[str, float]] = {}

    async def _user(self, context: Ctx) -> str:
        return await authenticate(context, self._lookup_token)

    async def _lookup_token(self, token: str) -> str | None:
        # Cached briefly: every call is authenticated, and a DB round trip each time would dominate
        # small requests. A revoked token stops working within TOKEN_CACHE_S.
        now = time.monotonic()
        hit = self._tokens.get(token)
        if hit is not None and hit[1] > now:
            return hit[0]
        user = await self.db(self.store.user_for_token, token)
        if user is not None:
            if len(self._tokens) > 10_000:
                self._tokens.clear()
            self._tokens[token] = (user, now + TOKEN_CACHE_S)
        return user

    def _load_run(self, name: str) -> client_pb2.Run:
        row = self.store.run_by_name(name)
        jobs = self.store.jobs_of_runs([row.id])[row.id]
        tags = self.store.tags_of_runs([row.id])[row.id]
        return run_to_proto(row, jobs, tags, self.engine.pending_reasons)

    async def _run(self, name: str) -> client_pb2.Run:
        return await self.db(self._load_run, name)

    @unary
    async def GetInfo(self, request: client_pb2.GetInfoRequest, context: Ctx) -> client_pb2.GetInfoResponse:
        user = await self._user(context)
        return client_pb2.GetInfoResponse(version=VERSION, user=user, local_mode=self.engine.config.local_mode)

    @unary
    async def HasCode(self, request: client_pb2.HasCodeRequest, context: Ctx) -> client_pb2.HasCodeResponse:
        await self._user(context)
        code_key(request.hash)
        if await self.db(self.store.has_code, request.hash):
            return client_pb2.HasCodeResponse(present=True)
        return client_pb2.HasCodeResponse(upload_url=await self.bookkeeping.code_upload_url(request.hash))

    @unary
    async def PutCode(
        self, request_iterator: AsyncIterator[client_pb2.PutCodeRequest], context: Ctx
    ) -> client_pb2.PutCodeResponse:
        await self._user(context)
        first = await anext(aiter(request_iterator))
        key = code_key(first.hash)

        async def chunks() -> AsyncIterator[bytes]:
            yield first.data
            async for msg in request_iterator:
                yield msg.data

        size, _ = await put_from_stream(self.artifacts, key, chunks(), expected_sha256=first.hash)
        await self.db(self.store.add_code, first.hash, size)
        return client_pb2.PutCodeResponse(bytes_received=size)

    @unary
    async def SubmitRun(self, request: client_pb2.SubmitRunRequest, context: Ctx) -> client_pb2.SubmitRunResponse:
        owner = await self._user(context)
        if not request.jobs:
            raise InvalidRequest("a run needs at least one job")
        names = [j.job_name for j in request.jobs]
        if len(set(names)) != len(names) or not all(names):
            raise InvalidRequest("job names within a run must be unique and non-empty")
        for j in request.jobs:
            unknown = set(j.depends_on) - set(names)
            if unknown:
                raise InvalidRequest(f"job {j.job_name!r} depends on unknown jobs: {', '.join(sorted(unknown))}")
            if j.resources.gpu.count > 1024 or j.resources.cpu < 0:
                raise InvalidRequest(f"job {j.job_name!r}: invalid resources")
        if request.code.hash and not await self.db(self.store.has_code, request.code.hash):
            # Uploaded straight to the store with a presigned URL: checked once, then recorded.
            size = await self.bookkeeping.verify_code(request.code.hash)
            if size is None:
                raise InvalidRequest(f"code {request.code.hash} was not uploaded")
            await self.db(self.store.add_code, request.code.hash, size)
        code = request.code.SerializeToString()
        if request.tag_on_done:
            check_tag_name(request.tag_on_done)

        def create() -> tuple[CreatedRun, list[common_pb2.JobSpec]]:
            # Tag and workflow dependencies resolve now, to the runs they name at submission.
            inputs = [
                [self.store.tag(t).run_id for t in j.input_tags]
                + [self.store.latest_done_run(w).id for w in j.input_workflows]
                for j in request.jobs
            ]
            name = self.store.reserve_run_name()
            specs = [with_run_name(j, name) for j in request.jobs]
            jobs = [
                NewJob(
                    job_name=j.job_name,
                    spec=j.SerializeToString(),
                    cpu=j.resources.cpu,
                    memory=j.resources.memory_bytes,
                    gpu_count=j.resources.gpu.count,
                    depends_on=list(j.depends_on),
                    inputs=job_inputs,
                )
                for j, job_inputs in zip(specs, inputs, strict=True)
            ]
            args = list(request.args)
            created = self.store.create_run(
                owner, request.workflow, code, request.code.hash, args, jobs, name, request.tag_on_done
            )
            return created, specs

        async def create_and_enqueue() -> client_pb2.Run:
            created, specs = await self.db(create)
            # The new run, as the database now holds it, built without reading it back.
            run = client_pb2.Run(
                name=created.name,
                workflow=request.workflow,
                owner=owner,
                status=common_pb2.RUN_STATUS_SUBMITTED,
                submitted_at_ns=created.submitted_at,
                code=request.code,
                jobs=[
                    client_pb2.Job(
                        id=job_id,
                        job_name=spec.job_name,
                        status=common_pb2.JOB_STATUS_SUBMITTED,
                        submitted_at_ns=created.submitted_at,
                        spec=spec,
                    )
                    for job_id, spec in zip(created.job_ids, specs, strict=True)
                ],
            )
            self.engine.queue.add_run(created.run_id, run)
            self.engine.kick()
            return run

        # Shielded: a client that gives up (deadline, Ctrl+C) must not leave a stored run unqueued.
        run = await asyncio.shield(create_and_enqueue())
        return client_pb2.SubmitRunResponse(run=run)

    @unary
    async def GetRun(self, request: client_pb2.GetRunRequest, context: Ctx) -> client_pb2.GetRunResponse:
        await self._user(context)
        return client_pb2.GetRunResponse(run=await self._run(request.name))

    @unary
    async def ListRuns(self, request: client_pb2.ListRunsRequest, context: Ctx) -> client_pb2.ListRunsResponse:
        await self._user(context)

        def load() -> list[client_pb2.Run]:
            rows = self.store.list_runs(request.all, request.limit or 1000)
            ids = [r.id for r in rows]
            jobs, tags = self.store.jobs_of_runs(ids), self.store.tags_of_runs(ids)
            return [run_to_proto(r, jobs[r.id], tags[r.id], self.engine.pending_reasons) for r in rows]

        return client_pb2.ListRunsResponse(runs=await self.db(load))

    @unary
    async def StopRun(self, request: client_pb2.StopRunRequest, context: Ctx) -> client_pb2.StopRunResponse:
        await self._user(context)
        await asyncio.shield(self.engine.stop_run(request.name))  # stop messages go out even if the client leaves
        return client_pb2.StopRunResponse(run=await self._run(request.name))

    @streaming
    async def StreamLogs(
        self, request: client_pb2.StreamLogsRequest, context: Ctx
    ) -> AsyncIterator[client_pb2.StreamLogsResponse]:
        await self._user(context)
        run = await self.db(self.store.run_by_name, request.run_name)
        jobs = (await self.db(self.store.jobs_of_runs, [run.id]))[run.id]
        # Logs of long-finished jobs live in the store (coordinator/retention.py), not the database.
        for j in jobs:
            if j.logs_state:
                async for part in self._archived_logs(run.name, j.job_name, j.logs_state):
                    yield part
        cursors = {j.id: 0 for j in jobs if not j.logs_state}
        names = {j.id: j.job_name for j in jobs}

        def read() -> list[client_pb2.JobLogs]:
            out = []
            budget = LOG_BATCH_BYTES  # one response stays far below gRPC's message limit
            for job_id, after in cursors.items():
                if budget <= 0:
                    break
                rows = self.store.read_logs(job_id, after, LOG_BATCH, budget)
                budget -= sum(len(r.text) + 32 for r in rows)
                if rows:
                    out.append(
                        client_pb2.JobLogs(
                            job_name=names[job_id],
                            lines=[log_line_to_proto(r) for r in rows],
                        )
                    )
            return out

        finished = False
        while True:
            event = self.engine.watchers.event(run.id)
            # Check for the end before reading: every line of a job is stored before its end is.
            if request.follow and not finished:
                finished = (await self.db(self.store.run_by_id, run.id)).finished_at is not None
            batch = await self.db(read)
            if batch:
                for jl in batch:
                    job_id = next(k for k, v in names.items() if v == jl.job_name)
                    cursors[job_id] = jl.lines[-1].seq
                yield client_pb2.StreamLogsResponse(jobs=batch)
                continue
            if not request.follow:
                return
            if finished:
                yield client_pb2.StreamLogsResponse(finished_run=await self._run(request.run_name))
                return
            try:
                await asyncio.wait_for(event.wait(), timeout=1.0)
            except TimeoutError:
                pass

    async def _archived_logs(
        self, run_name: str, job_name: str, state: int
    ) -> AsyncIterator[client_pb2.StreamLogsResponse]:
        if state == 2:
            text = "[dstack: the logs of this job were deleted by the retention policy]"
            yield client_pb2.StreamLogsResponse(
                jobs=[
                    client_pb2.JobLogs(
                        job_name=job_name,
                        lines=[common_pb2.LogLine(seq=1, stream=common_pb2.LOG_STREAM_SYSTEM, text=text)],
                    )
                ]
            )
            return
        lines = await asyncio.to_thread(read_log_archive, self.artifacts, logs_key(run_name, job_name))
        for i in range(0, len(lines), LOG_BATCH):
            yield client_pb2.StreamLogsResponse(
                jobs=[client_pb2.JobLogs(job_name=job_name, lines=lines[i : i + LOG_BATCH])]
            )

    @unary
    async def ListArtifacts(
        self, request: client_pb2.ListArtifactsRequest, context: Ctx
    ) -> client_pb2.ListArtifactsResponse:
        await self._user(context)
        run = await self.db(self.store.run_by_name, request.run_name)
        rows = await self.db(self.store.list_artifacts, run.id)
        urls: list[str] = []
        if request.with_urls and self.bookkeeping.presigns:
            urls = await self.bookkeeping.download_urls([artifact_key(run.name, r.job_name, r.path) for r in rows])
        return client_pb2.ListArtifactsResponse(
            files=[
                common_pb2.ArtifactFile(job_name=r.job_name, path=r.path, size=r.size, sha256=r.sha256) for r in rows
            ],
            urls=urls,
        )

    @streaming
    async def DownloadArtifact(
        self, request: client_pb2.DownloadArtifactRequest, context: Ctx
    ) -> AsyncIterator[client_pb2.DataChunk]:
        await self._user(context)
        async for chunk in stream_artifact(self.engine, self.artifacts, request):
            yield chunk

    @unary
    async def CreateUpload(
        self, request: client_pb2.CreateUploadRequest, context: Ctx
    ) -> client_pb2.CreateUploadResponse:
        owner = await self._user(context)
        check_tag_name(request.tag)
        if not _NAME.fullmatch(request.workflow):
            raise InvalidRequest(f"invalid workflow name {request.workflow!r}")
        for f in request.files:  # before the run exists: a refused upload leaves nothing behind
            check_relative_path(f.path)
        _, name, _ = await self.db(self.store.create_upload_run, owner, request.workflow, request.tag)
        if not self.bookkeeping.presigns:
            return client_pb2.CreateUploadResponse(run_name=name, stream=True)
        grants = await self.bookkeeping.grant_uploads(name, request.workflow, request.files)
        return client_pb2.CreateUploadResponse(run_name=name, grants=grants)

    @unary
    async def PutArtifact(
        self, request_iterator: AsyncIterator[client_pb2.PutArtifactRequest], context: Ctx
    ) -> client_pb2.PutArtifactResponse:
        await self._user(context)
        first = await anext(aiter(request_iterator))
        job = await self.db(self.store.upload_job, first.run_name)
        key = artifact_key(first.run_name, job.job_name, check_relative_path(first.path))
        size, digest = await put_from_messages(self.artifacts, key, first, request_iterator)
        return client_pb2.PutArtifactResponse(size=size, sha256=digest)

    @unary
    async def CommitUpload(
        self, request: client_pb2.CommitUploadRequest, context: Ctx
    ) -> client_pb2.CommitUploadResponse:
        await self._user(context)
        job = await self.db(self.store.upload_job, request.run_name)
        files = [(check_relative_path(f.path), f.size, f.sha256) for f in request.files]
        await self.bookkeeping.commit(request.run_name, job.job_name, files, request.completed)
        await self.db(self.store.finish_upload_run, request.run_name, files)
        return client_pb2.CommitUploadResponse(run=await self._run(request.run_name))

    @unary
    async def DeleteRun(self, request: client_pb2.DeleteRunRequest, context: Ctx) -> client_pb2.DeleteRunResponse:
        await self._user(context)
        run = await self.db(self.store.deletable_run, request.name)
        # Objects first: if this fails halfway, the run is still listed and `dstack rm` can be repeated.
        deleted = await self.bookkeeping.delete_run(run.name)
        await self.db(self.store.delete_run, run.id)
        return client_pb2.DeleteRunResponse(objects_deleted=deleted)

    @unary
    async def ListAgents(self, request: client_pb2.ListAgentsRequest, context: Ctx) -> client_pb2.ListAgentsResponse:
        await self._user(context)

        def load() -> list[client_pb2.Agent]:
            busy: dict[str, list[int]] = {}
            count: dict[str, int] = {}
            for a in self.store.active_allocations():
                busy.setdefault(a.agent_id, []).extend(a.gpu_indices)
                count[a.agent_id] = count.get(a.agent_id, 0) + 1
            return [
                client_pb2.Agent(
                    id=r.id,
                    name=r.name,
                    status=r.status,
                    inventory=inventory_from_bytes(r.inventory),
                    running_jobs=count.get(r.id, 0),
                    last_heartbeat_ns=r.last_heartbeat,
                    busy_gpu_indices=sorted(busy.get(r.id, [])),
                )
                for r in self.store.list_agents()
            ]

        return client_pb2.ListAgentsResponse(agents=await self.db(load))

    @unary
    async def AddTag(self, request: client_pb2.AddTagRequest, context: Ctx) -> client_pb2.AddTagResponse:
        await self._user(context)
        check_tag_name(request.tag)
        return client_pb2.AddTagResponse(
            tag=tag_to_proto(await self.db(self.store.add_tag, request.tag, request.run_name))
        )

    @unary
    async def ListTags(self, request: client_pb2.ListTagsRequest, context: Ctx) -> client_pb2.ListTagsResponse:
        await self._user(context)
        return client_pb2.ListTagsResponse(tags=[tag_to_proto(r) for r in await self.db(self.store.list_tags)])

    @unary
    async def DeleteTag(self, request: client_pb2.DeleteTagRequest, context: Ctx) -> client_pb2.DeleteTagResponse:
        await self._user(context)
        await self.db(self.store.delete_tag, request.tag)
        return client_pb2.DeleteTagResponse()

    @unary
    async def AddSecret(self, request: client_pb2.AddSecretRequest, context: Ctx) -> client_pb2.AddSecretResponse:
        await self._user(context)
        check_secret_name(request.name)
        if not request.value:
            raise InvalidRequest("a secret needs a value")
        row = await self.db(self.store.put_secret, request.name, self.engine.secret_box.encrypt(request.value))
        self.engine.secrets[request.name] = request.value
        return client_pb2.AddSecretResponse(secret=secret_to_proto(row))

    @unary
    async def ListSecrets(self, request: client_pb2.ListSecretsRequest, context: Ctx) -> client_pb2.ListSecretsResponse:
        await self._user(context)
        return client_pb2.ListSecretsResponse(
            secrets=[secret_to_proto(r) for r in await self.db(self.store.list_secrets)]
        )

    @unary
    async def DeleteSecret(
        self, request: client_pb2.DeleteSecretRequest, context: Ctx
    ) -> client_pb2.DeleteSecretResponse:
        await self._user(context)
        await self.db(self.store.delete_secret, request.name)
        self.engine.secrets.pop(request.name, None)
        return client_pb2.DeleteSecretResponse()


def secret_to_proto(r: SecretRow) -> client_pb2.Secret:
    return client_pb2.Secret(name=r.name, created_at_ns=r.created_at, updated_at_ns=r.updated_at)


# Tags, and the workflow names an uploaded artifact set stands for.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_tag_name(tag: str) -> None:
    if not _NAME.fullmatch(tag):
        raise InvalidRequest(f"invalid tag {tag!r}: letters, digits, '.', '_' and '-', starting with a letter or digit")


def tag_to_proto(r: TagRow) -> client_pb2.Tag:
    return client_pb2.Tag(name=r.name, run_name=r.run_name, workflow=r.workflow, created_at_ns=r.created_at)
