"""A blocking client of the coordinator's ClientService, with gRPC errors turned into CLI errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from dstack.cli.errors import AuthError, CliError, CoordinatorUnreachable, NotFoundError, RequestRejected
from dstack.cli.home import Endpoint
from dstack.protos.v1 import client_pb2, client_pb2_grpc, common_pb2

T = TypeVar("T")
CHUNK = 1 << 20


def _translate(e: grpc.RpcError, address: str) -> CliError:
    code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (e.details() if isinstance(e, grpc.Call) else None) or str(code)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return CoordinatorUnreachable(
            f"cannot reach the coordinator at {address}: {details}. Check `dstack config` and that it is running."
        )
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFoundError(details)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AuthError(details)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        return RequestRejected(details)
    return CliError(f"the coordinator failed: {code.name}: {details}")


class Client:
    def __init__(self, endpoint: Endpoint, timeout: float = 30.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.channel = grpc.insecure_channel(
            endpoint.address,
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
                # A followed log stream may be quiet for hours: pings find a link that died silently
                # (no reset ever comes), so `dstack logs -f` can resume instead of waiting forever.
                ("grpc.keepalive_time_ms", 20_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.max_pings_without_data", 0),
            ],
        )
        self.stub = client_pb2_grpc.ClientServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {endpoint.token}")]

    def close(self) -> None:
        self.channel.close()

    def _call(self, fn: Callable[..., T], request: Any, **kw: Any) -> T:
        try:
            return fn(request, metadata=self.metadata, timeout=kw.pop("timeout", self.timeout), **kw)
        except grpc.RpcError as e:
            raise _translate(e, self.endpoint.address) from None

    def _stream(self, fn: Callable[..., Iterator[T]], request: Any) -> Iterator[T]:
        try:
            yield from fn(request, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _translate(e, self.endpoint.address) from None

    def info(self, timeout: float | None = None) -> client_pb2.GetInfoResponse:
        resp: client_pb2.GetInfoResponse = self._call(
            self.stub.GetInfo, client_pb2.GetInfoRequest(), timeout=timeout or self.timeout
        )
        return resp

    def has_code(self, code_hash: str) -> client_pb2.HasCodeResponse:
        resp: client_pb2.HasCodeResponse = self._call(self.stub.HasCode, client_pb2.HasCodeRequest(hash=code_hash))
        return resp

    def put_code(self, code_hash: str, data: bytes) -> int:
        def chunks() -> Iterator[client_pb2.PutCodeRequest]:
            yield client_pb2.PutCodeRequest(hash=code_hash, size=len(data), data=data[:CHUNK])
            for i in range(CHUNK, len(data), CHUNK):
                yield client_pb2.PutCodeRequest(data=data[i : i + CHUNK])

        resp: client_pb2.PutCodeResponse = self._call(self.stub.PutCode, chunks(), timeout=600)
        return resp.bytes_received

    def submit(self, request: client_pb2.SubmitRunRequest) -> client_pb2.Run:
        resp: client_pb2.SubmitRunResponse = self._call(self.stub.SubmitRun, request)
        return resp.run

    def get_run(self, name: str) -> client_pb2.Run:
        resp: client_pb2.GetRunResponse = self._call(self.stub.GetRun, client_pb2.GetRunRequest(name=name))
        return resp.run

    def list_runs(self, include_all: bool) -> list[client_pb2.Run]:
        return list(self._call(self.stub.ListRuns, client_pb2.ListRunsRequest(all=include_all)).runs)

    def stop_run(self, name: str) -> client_pb2.Run:
        resp: client_pb2.StopRunResponse = self._call(self.stub.StopRun, client_pb2.StopRunRequest(name=name))
        return resp.run

    def logs(
        self, name: str, follow: bool, after: dict[str, int] | None = None
    ) -> Iterator[client_pb2.StreamLogsResponse]:
        """The run's log stream; with `after` (job name -> last seq received), only the lines that follow."""
        cursor = [client_pb2.LogCursor(job_name=k, seq=v) for k, v in (after or {}).items()]
        return self._stream(
            self.stub.StreamLogs, client_pb2.StreamLogsRequest(run_name=name, follow=follow, after=cursor)
        )

    def list_artifacts(self, name: str) -> list[Any]:
        return list(self._call(self.stub.ListArtifacts, client_pb2.ListArtifactsRequest(run_name=name)).files)

    def list_artifacts_with_urls(self, name: str) -> client_pb2.ListArtifactsResponse:
        resp: client_pb2.ListArtifactsResponse = self._call(
            self.stub.ListArtifacts, client_pb2.ListArtifactsRequest(run_name=name, with_urls=True)
        )
        return resp

    def create_upload(
        self, workflow: str, tag: str, files: list[common_pb2.FileSize]
    ) -> client_pb2.CreateUploadResponse:
        req = client_pb2.CreateUploadRequest(workflow=workflow, tag=tag, files=files)
        resp: client_pb2.CreateUploadResponse = self._call(self.stub.CreateUpload, req, timeout=300)
        return resp

    def put_artifact(self, run_name: str, path: str, chunks: Iterator[bytes]) -> client_pb2.PutArtifactResponse:
        def requests() -> Iterator[client_pb2.PutArtifactRequest]:
            first = True
            for data in chunks:
                yield client_pb2.PutArtifactRequest(
                    run_name=run_name if first else "", path=path if first else "", data=data
                )
                first = False
            if first:
                yield client_pb2.PutArtifactRequest(run_name=run_name, path=path)

        resp: client_pb2.PutArtifactResponse = self._call(self.stub.PutArtifact, requests(), timeout=3600)
        return resp

    def commit_upload(
        self, run_name: str, files: list[common_pb2.ArtifactFile], completed: list[common_pb2.CompletedUpload]
    ) -> client_pb2.Run:
        req = client_pb2.CommitUploadRequest(run_name=run_name, files=files, completed=completed)
        resp: client_pb2.CommitUploadResponse = self._call(self.stub.CommitUpload, req, timeout=300)
        return resp.run

    def delete_run(self, name: str) -> int:
        resp: client_pb2.DeleteRunResponse = self._call(
            self.stub.DeleteRun, client_pb2.DeleteRunRequest(name=name), timeout=300
        )
        return resp.objects_deleted

    def download(self, run: str, job: str, path: str) -> Iterator[bytes]:
        req = client_pb2.DownloadArtifactRequest(run_name=run, job_name=job, path=path)
        for chunk in self._stream(self.stub.DownloadArtifact, req):
            yield chunk.data

    def list_agents(self) -> list[client_pb2.Agent]:
        return list(self._call(self.stub.ListAgents, client_pb2.ListAgentsRequest()).agents)

    def add_tag(self, tag: str, run: str) -> client_pb2.Tag:
        resp: client_pb2.AddTagResponse = self._call(self.stub.AddTag, client_pb2.AddTagRequest(tag=tag, run_name=run))
        return resp.tag

    def list_tags(self) -> list[client_pb2.Tag]:
        resp: client_pb2.ListTagsResponse = self._call(self.stub.ListTags, client_pb2.ListTagsRequest())
        return list(resp.tags)

    def delete_tag(self, tag: str) -> None:
        self._call(self.stub.DeleteTag, client_pb2.DeleteTagRequest(tag=tag))

    def add_secret(self, name: str, value: str, personal: bool = False) -> client_pb2.Secret:
        req = client_pb2.AddSecretRequest(name=name, value=value, personal=personal)
        resp: client_pb2.AddSecretResponse = self._call(self.stub.AddSecret, req)
        return resp.secret

    def list_secrets(self) -> list[client_pb2.Secret]:
        resp: client_pb2.ListSecretsResponse = self._call(self.stub.ListSecrets, client_pb2.ListSecretsRequest())
        return list(resp.secrets)

    def delete_secret(self, name: str, personal: bool = False) -> None:
        self._call(self.stub.DeleteSecret, client_pb2.DeleteSecretRequest(name=name, personal=personal))

    # ---- enrolment (admin only) ----------------------------------------------------------------
    def create_join_token(self, ttl_s: float, max_uses: int) -> client_pb2.CreateJoinTokenResponse:
        req = client_pb2.CreateJoinTokenRequest(ttl_s=ttl_s, max_uses=max_uses)
        resp: client_pb2.CreateJoinTokenResponse = self._call(self.stub.CreateJoinToken, req)
        return resp

    def list_join_tokens(self) -> list[client_pb2.JoinToken]:
        req = client_pb2.ListJoinTokensRequest()
        resp: client_pb2.ListJoinTokensResponse = self._call(self.stub.ListJoinTokens, req)
        return list(resp.join_tokens)

    def revoke_join_token(self, token_id: str) -> client_pb2.JoinToken:
        req = client_pb2.RevokeJoinTokenRequest(id=token_id)
        resp: client_pb2.RevokeJoinTokenResponse = self._call(self.stub.RevokeJoinToken, req)
        return resp.join_token

    def remove_agent(self, name: str) -> int:
        req = client_pb2.RemoveAgentRequest(name=name)
        resp: client_pb2.RemoveAgentResponse = self._call(self.stub.RemoveAgent, req)
        return resp.failed_jobs

    def approve_agent(self, name: str) -> None:
        self._call(self.stub.ApproveAgent, client_pb2.ApproveAgentRequest(name=name))

    # ---- users (admin only, but listing) -------------------------------------------------------
    def add_user(self, name: str, role: str) -> client_pb2.AddUserResponse:
        resp: client_pb2.AddUserResponse = self._call(
            self.stub.AddUser, client_pb2.AddUserRequest(name=name, role=role)
        )
        return resp

    def list_users(self) -> list[client_pb2.User]:
        resp: client_pb2.ListUsersResponse = self._call(self.stub.ListUsers, client_pb2.ListUsersRequest())
        return list(resp.users)

    def remove_user(self, name: str) -> None:
        self._call(self.stub.RemoveUser, client_pb2.RemoveUserRequest(name=name))

    def rotate_user_token(self, name: str) -> client_pb2.RotateUserTokenResponse:
        req = client_pb2.RotateUserTokenRequest(name=name)
        resp: client_pb2.RotateUserTokenResponse = self._call(self.stub.RotateUserToken, req)
        return resp
