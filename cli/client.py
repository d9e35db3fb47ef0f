"""A blocking client of the coordinator's ClientService, with gRPC errors turned into CLI errors."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

# gRPC's C core logs a failed TLS handshake on stderr at INFO; the CLI says it once, in words (_translate).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # after the verbosity, which gRPC reads when it loads

from dstack.cli.errors import (
    AuthError,
    CliError,
    CoordinatorUnreachable,
    LimitReached,
    NotFoundError,
    RequestRejected,
    TlsMismatch,
)
from dstack.cli.home import Endpoint
from dstack.protos.v1 import client_pb2, client_pb2_grpc, common_pb2

if TYPE_CHECKING:  # dstack.tls (and its hashlib) is imported where TLS is set up or diagnosed, not for a socket
    from dstack.tls import Transport

T = TypeVar("T")
CHUNK = 1 << 20
# The page token of the listing's finished part (its latest finished runs; coordinator/store/runs.py
# listing_page): a token the coordinator hands out itself once the unfinished runs are all sent.
FINISHED_PAGE = "finished::"
SUBMIT_RUNS_MAX = 1000  # runs per SubmitRuns call (the coordinator refuses more: coordinator/app/runs.py)


class SubmitRunsUnsupported(Exception):
    """The coordinator predates SubmitRuns: submit the runs one by one."""


class BatchNotStored(CliError):
    """SubmitRuns failed as a whole on the coordinator (ABORTED: a database fault undid the batch): none
    of its runs was stored, so sending them again submits each once."""


CHANNEL_OPTIONS: list[tuple[str, str | int]] = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    # A followed log stream may be quiet for hours: pings find a link that died silently
    # (no reset ever comes), so `dstack logs -f` can resume instead of waiting forever.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]

PIN_HINT = (
    "run `dstack config --coordinator {address} --ca-file CA.pem` (the server's STATE_DIR/tls/ca.pem) or"
    " `--ca-fingerprint SHA256:...` (printed by `dstack server`); in scripts, set DSTACK_CA_FILE"
)


def transport(endpoint: Endpoint) -> Transport:
    """How the CLI reaches `endpoint`: plaintext, or TLS verified against its CA file (else the system's roots)."""
    from dstack.tls import TlsSetupError, Transport, read_ca_file

    if endpoint.plaintext:
        return Transport(insecure=True)
    if not endpoint.ca_file:
        return Transport()
    try:
        return Transport(ca_pem=read_ca_file(os.path.expanduser(endpoint.ca_file)), ca_source=endpoint.ca_file)
    except TlsSetupError as e:
        raise TlsMismatch(f"{e}; {PIN_HINT.format(address=endpoint.address)}") from None


def open_channel(endpoint: Endpoint, via: Transport | None = None) -> grpc.Channel:
    if via is None and endpoint.plaintext:
        return grpc.insecure_channel(endpoint.address, options=CHANNEL_OPTIONS)
    t = via or transport(endpoint)
    if t.insecure:
        return grpc.insecure_channel(endpoint.address, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(endpoint.address, t.credentials(), options=[*CHANNEL_OPTIONS, *t.options()])


def _tls_error(endpoint: Endpoint, details: str) -> CliError | None:
    """A handshake failure in words a user can act on, or None when it is none."""
    from dstack.tls import handshake_failure, speaks_tls

    address = endpoint.address
    if endpoint.address.startswith("unix:"):
        return None
    if endpoint.insecure:
        # A TLS server closes a plaintext connection without a word: ask it whether it speaks TLS.
        if "Socket closed" in details or "Connection reset" in details:
            if speaks_tls(address):
                return TlsMismatch(
                    f"the coordinator at {address} speaks TLS, and this CLI is set to plaintext (--insecure or"
                    f" DSTACK_INSECURE): {PIN_HINT.format(address=address)}"
                )
        return None
    kind = handshake_failure(details)
    if kind == "plaintext":
        return TlsMismatch(
            f"the coordinator at {address} does not speak TLS (was it started with --insecure?). Plaintext shows"
            " tokens and secrets to anyone on the network: use `dstack config --coordinator"
            f" {address} --insecure` (or DSTACK_INSECURE=1) only on a network you trust completely"
        )
    if kind == "untrusted":
        if endpoint.ca_file:
            return TlsMismatch(
                f"the certificate of the coordinator at {address} does not match the pinned CA ({endpoint.ca_file})."
                " If the coordinator's CA was made anew, pin the new one (`dstack config --coordinator"
                f" {address} --ca-fingerprint SHA256:...`); if not, something is answering in its place"
            )
        return TlsMismatch(
            f"the coordinator at {address} speaks TLS with a certificate this CLI does not trust: "
            + PIN_HINT.format(address=address)
        )
    return None


def _translate(e: grpc.RpcError, endpoint: Endpoint) -> CliError:
    address = endpoint.address
    code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (e.details() if isinstance(e, grpc.Call) else None) or str(code)
    if code == grpc.StatusCode.UNAVAILABLE and (tls := _tls_error(endpoint, details)) is not None:
        return tls
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return CoordinatorUnreachable(
            f"cannot reach the coordinator at {address}: {details}. Check `dstack config` and that it is running."
        )
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFoundError(details)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AuthError(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # a per-user limit: the message names it and the numbers
        return LimitReached(details)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        return RequestRejected(details)
    return CliError(f"the coordinator failed: {code.name}: {details}")


class Client:
    def __init__(self, endpoint: Endpoint, timeout: float = 30.0, via: Transport | None = None) -> None:
        """`via`: the transport to use instead of the endpoint's (`dstack config` checks a CA before saving it)."""
        self.endpoint = endpoint
        self.timeout = timeout
        self.channel = open_channel(endpoint, via)
        self.stub = client_pb2_grpc.ClientServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {endpoint.token}")]

    def close(self) -> None:
        self.channel.close()

    def _call(self, fn: Callable[..., T], request: Any, **kw: Any) -> T:
        try:
            return fn(request, metadata=self.metadata, timeout=kw.pop("timeout", self.timeout), **kw)
        except grpc.RpcError as e:
            raise _translate(e, self.endpoint) from None

    def _stream(self, fn: Callable[..., Iterator[T]], request: Any) -> Iterator[T]:
        try:
            yield from fn(request, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _translate(e, self.endpoint) from None

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

    def submit_runs(self, requests: list[client_pb2.SubmitRunRequest]) -> list[client_pb2.Run | str]:
        """Many runs in one call (at most SUBMIT_RUNS_MAX): each stored run, or the reason it was refused, in
        the order of `requests`. SubmitRunsUnsupported: the coordinator predates the call."""
        try:
            resp: client_pb2.SubmitRunsResponse = self.stub.SubmitRuns(
                client_pb2.SubmitRunsRequest(runs=requests), metadata=self.metadata, timeout=max(self.timeout, 120.0)
            )
        except grpc.RpcError as e:
            if isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise SubmitRunsUnsupported() from None
            if isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.ABORTED:
                raise BatchNotStored(e.details() or "the coordinator stored none of these runs") from None
            raise _translate(e, self.endpoint) from None
        return [error or run for run, error in zip(resp.runs, resp.errors, strict=True)]

    def get_run(self, name: str) -> client_pb2.Run:
        resp: client_pb2.GetRunResponse = self._call(self.stub.GetRun, client_pb2.GetRunRequest(name=name))
        return resp.run

    def list_runs(self, include_all: bool) -> list[client_pb2.Run]:
        """Every page of the listing, newest first (a coordinator before pages sends one, and no token)."""
        runs: list[client_pb2.Run] = []
        token = ""
        while True:
            req = client_pb2.ListRunsRequest(all=include_all, page_token=token)
            resp: client_pb2.ListRunsResponse = self._call(self.stub.ListRuns, req)
            runs += resp.runs
            if not resp.next_page_token or resp.next_page_token == token:
                break
            token = resp.next_page_token
        # Stable: runs submitted in the same nanosecond keep the coordinator's order.
        return sorted(runs, key=lambda r: -r.submitted_at_ns)

    def list_runs_head(self, include_all: bool, limit: int) -> tuple[list[client_pb2.Run], bool]:
        """What `dstack ps` shows at once: the first `limit` runs of the listing (unfinished ones newest
        first, then the latest finished; with `include_all`, every run newest first), and whether more
        were left out. When unfinished runs alone fill the page (a deep queue), the latest finished ones
        are added from the listing's finished part, so a run that just ended is still seen: one call, not
        the hundred pages of 100,000 queued runs. The call that ends the head asks for them with its page
        (ListRunsRequest.with_finished: one snapshot, so a run that ends meanwhile is in one or the other);
        a coordinator that predates that field is asked in a second call, after the page, as before."""
        runs: list[client_pb2.Run] = []
        token = ""
        finished: list[client_pb2.Run] | None = None
        while len(runs) < limit:
            size = min(limit - len(runs), 1000)
            last = size == limit - len(runs)  # this page ends the head: the finished runs come with it
            req = client_pb2.ListRunsRequest(
                all=include_all, limit=size, page_token=token, with_finished=last and not include_all
            )
            resp: client_pb2.ListRunsResponse = self._call(self.stub.ListRuns, req)
            runs += resp.runs
            if not resp.next_page_token or resp.next_page_token == token:
                return runs, False
            token = resp.next_page_token
            if resp.finished_sent:
                finished = list(resp.finished)
        if include_all:
            return runs, True
        # The page is full and the finished part (the latest RECENT_FINISHED runs) was not reached.
        if finished is None:
            finished = list(self._call(self.stub.ListRuns, client_pb2.ListRunsRequest(page_token=FINISHED_PAGE)).runs)
        names = {r.name for r in runs}
        runs += [r for r in finished if r.name not in names]
        return runs, not token.startswith(FINISHED_PAGE)  # unfinished runs were left out

    def stop_run(self, name: str) -> client_pb2.Run:
        resp: client_pb2.StopRunResponse = self._call(self.stub.StopRun, client_pb2.StopRunRequest(name=name))
        return resp.run

    def logs(
        self, name: str, follow: bool, after: dict[str, int] | None = None, blocks: bool = False
    ) -> Iterator[client_pb2.StreamLogsResponse]:
        """The run's log stream; with `after` (job name -> last seq received), only the lines that follow;
        with `blocks`, lines may come packed (JobLogs.blocks)."""
        cursor = [client_pb2.LogCursor(job_name=k, seq=v) for k, v in (after or {}).items()]
        request = client_pb2.StreamLogsRequest(run_name=name, follow=follow, after=cursor, blocks=blocks)
        return self._stream(self.stub.StreamLogs, request)

    def list_artifacts(self, name: str) -> list[Any]:
        return list(self._call(self.stub.ListArtifacts, client_pb2.ListArtifactsRequest(run_name=name)).files)

    def list_artifacts_with_urls(self, name: str) -> client_pb2.ListArtifactsResponse:
        resp: client_pb2.ListArtifactsResponse = self._call(
            self.stub.ListArtifacts, client_pb2.ListArtifactsRequest(run_name=name, with_urls=True)
        )
        return resp

    def create_upload(
        self, workflow: str, tag: str, files: list[common_pb2.FileSize], repository: str = ""
    ) -> client_pb2.CreateUploadResponse:
        req = client_pb2.CreateUploadRequest(workflow=workflow, tag=tag, files=files, repository=repository)
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

    def run_record(self, name: str, grant_code: bool = False) -> client_pb2.GetRunRecordResponse:
        req = client_pb2.GetRunRecordRequest(run_name=name, grant_code=grant_code)
        resp: client_pb2.GetRunRecordResponse = self._call(self.stub.GetRunRecord, req)
        return resp

    def rerun(self, request: client_pb2.RerunRunRequest) -> client_pb2.RerunRunResponse:
        resp: client_pb2.RerunRunResponse = self._call(self.stub.RerunRun, request)
        return resp

    def download_run_code(self, name: str, diff: bool) -> Iterator[bytes]:
        req = client_pb2.DownloadRunCodeRequest(run_name=name, diff=diff)
        for chunk in self._stream(self.stub.DownloadRunCode, req):
            yield chunk.data

    def list_agents(self) -> list[client_pb2.Agent]:
        return list(self._call(self.stub.ListAgents, client_pb2.ListAgentsRequest()).agents)

    def add_tag(self, tag: str, run: str) -> client_pb2.Tag:
        resp: client_pb2.AddTagResponse = self._call(self.stub.AddTag, client_pb2.AddTagRequest(tag=tag, run_name=run))
        return resp.tag

    def list_tags(self, repository: str = "", include_all: bool = False) -> list[client_pb2.Tag]:
        req = client_pb2.ListTagsRequest(repository=repository, all=include_all)
        resp: client_pb2.ListTagsResponse = self._call(self.stub.ListTags, req)
        return list(resp.tags)

    def get_tag(self, ref: str, repository: str) -> client_pb2.Tag:
        req = client_pb2.GetTagRequest(ref=ref, repository=repository)
        resp: client_pb2.GetTagResponse = self._call(self.stub.GetTag, req)
        return resp.tag

    def delete_tag(self, tag: str, repository: str = "") -> None:
        self._call(self.stub.DeleteTag, client_pb2.DeleteTagRequest(tag=tag, repository=repository))

    def set_user_limits(self, request: client_pb2.SetUserLimitsRequest) -> client_pb2.UserLimits:
        resp: client_pb2.SetUserLimitsResponse = self._call(self.stub.SetUserLimits, request)
        return resp.user

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

    def preempt_run(self, name: str) -> tuple[int, client_pb2.Run]:
        resp: client_pb2.PreemptRunResponse = self._call(self.stub.PreemptRun, client_pb2.PreemptRunRequest(name=name))
        return resp.preempted, resp.run

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
