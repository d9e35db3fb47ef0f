"""The agent's retry policy (agent/retry.py) on its real code paths: the code cache, a job runner and the
artifact uploader, talking to a real HTTP server that answers as a store does (scripted failures), with
the coordinator's side replaced by a stub that hands out presigned-looking URLs."""

from __future__ import annotations

import asyncio
import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from dstack.agent.artifacts import ArtifactError, Downloader, Uploader
from dstack.agent.code import CodeCache, CodeError
from dstack.agent.outbox import Outbox
from dstack.agent.retry import RetryPolicy
from dstack.agent.runner import Janitor, JobRunner, RunnerDeps
from dstack.agent.runtimes.null import NullRuntime
from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from dstack.storage.backoff import Backoff
from dstack.storage.transfer import Transfer

pytestmark = pytest.mark.integration

EXPIRED = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
DENIED = b"<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature does not match</Message></Error>"
SLOW_DOWN = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
# Short backoff, long deadline: a retry that should happen does so at once, a wrong wait shows as a hang.
FAST = RetryPolicy(Backoff(deadline_s=60.0, first_s=0.001, max_s=0.01))


@dataclass
class FakeStore:
    """Serves PUT and GET of objects; `script[(method, path, grant)]` lists answers given first."""

    objects: dict[str, bytes] = field(default_factory=dict)
    script: dict[tuple[str, str, str], list[tuple[int, bytes]]] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, method: str, url: str, body: bytes) -> tuple[int, bytes, dict[str, str]]:
        u = urlsplit(url)
        grant = parse_qs(u.query).get("grant", [""])[0]
        with self.lock:
            self.requests.append((method, u.path, grant))
            scripted = self.script.get((method, u.path, grant)) or self.script.get((method, u.path, "*"))
            if scripted:
                status, text = scripted.pop(0)
                return status, text, {}
            if method == "PUT":
                self.objects[u.path] = body
                return 200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}
            data = self.objects.get(u.path)
            if data is None:
                return 404, b"<Error><Code>NoSuchKey</Code><Message>no such key</Message></Error>", {}
            return 200, data, {}

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.requests if (m, p) == (method, path))


@pytest.fixture
def store() -> Iterator[tuple[FakeStore, str]]:
    fake = FakeStore()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, data, headers = fake.answer(self.command, self.path, body)
            self.send_response(status)
            for k, v in {"Content-Length": str(len(data)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = _serve

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


GrantRequest = agent_pb2.GetCodeRequest | agent_pb2.GrantUploadsRequest | agent_pb2.GrantDownloadsRequest
Metadata = Sequence[tuple[str, str]] | None


class CoordinatorStub(agent_pb2_grpc.AgentServiceStub):
    """GrantCode / GrantUploads / CommitArtifacts as the coordinator answers them with an S3 store: a
    URL per object, numbered by grant so the store can tell a fresh grant from an old one. (A subclass
    of the real stub, for its type only: no channel, and the calls the agent makes are these methods.)"""

    def __init__(self, base: str) -> None:
        self.base = base
        self.grants: list[GrantRequest] = []
        self.commits: list[agent_pb2.CommitArtifactsRequest] = []

    def granted_paths(self, n: int) -> list[str]:
        """The paths of the files in the n-th grant (of uploads or downloads)."""
        grant = self.grants[n]
        assert not isinstance(grant, agent_pb2.GetCodeRequest), grant
        return [f.path for f in grant.files]

    def _url(self, key: str) -> str:
        return f"{self.base}/dstack/{key}?grant={len(self.grants)}&X-Amz-Credential=AKID%2F20260101%2Fus-east-1"

    async def GrantCode(self, req: agent_pb2.GetCodeRequest, metadata: Metadata = None) -> agent_pb2.GrantCodeResponse:
        self.grants.append(req)
        return agent_pb2.GrantCodeResponse(url=self._url(f"code/{req.hash}.tar.gz"))

    async def GrantUploads(
        self, req: agent_pb2.GrantUploadsRequest, metadata: Metadata = None
    ) -> agent_pb2.GrantUploadsResponse:
        self.grants.append(req)
        grants = [common_pb2.UploadGrant(path=f.path, url=self._url(f"art/{f.path}")) for f in req.files]
        return agent_pb2.GrantUploadsResponse(grants=grants)

    async def GrantDownloads(
        self, req: agent_pb2.GrantDownloadsRequest, metadata: Metadata = None
    ) -> agent_pb2.GrantDownloadsResponse:
        self.grants.append(req)
        return agent_pb2.GrantDownloadsResponse(urls=[self._url(f"runs/{f.run_name}/{f.path}") for f in req.files])

    async def CommitArtifacts(
        self, req: agent_pb2.CommitArtifactsRequest, metadata: Metadata = None
    ) -> agent_pb2.CommitArtifactsResponse:
        self.commits.append(req)
        return agent_pb2.CommitArtifactsResponse()


def code_blob(name: str = "main.py") -> tuple[bytes, str]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"print('hi')\n"
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    blob = buf.getvalue()
    return blob, hashlib.sha256(blob).hexdigest()


def code_cache(tmp_path: Path, base: str, policy: RetryPolicy) -> tuple[CodeCache, CoordinatorStub, Transfer]:
    stub = CoordinatorStub(base)
    transfer = Transfer(backoff=policy.backoff, retryable=policy.retries_in_place)
    return CodeCache(tmp_path / "code", stub, list, transfer, policy), stub, transfer


def test_code_download_retries_a_transient_failure_and_succeeds(store: tuple[FakeStore, str], tmp_path: Path) -> None:
    fake, base = store
    blob, h = code_blob()
    path = f"/dstack/code/{h}.tar.gz"
    fake.objects[path] = blob
    fake.script[("GET", path, "*")] = [(503, SLOW_DOWN), (500, b"")]  # twice, then it serves
    cache, stub, transfer = code_cache(tmp_path, base, FAST)
    with transfer:
        asyncio.run(cache.materialize(common_pb2.CodeRef(hash=h, size=len(blob)), tmp_path / "job"))
    assert (tmp_path / "job" / "main.py").read_text() == "print('hi')\n"
    assert fake.count("GET", path) == 3 and len(stub.grants) == 1  # retried in place, with the same grant


def _run_job(
    tmp_path: Path, cache: CodeCache, stub: CoordinatorStub, transfer: Transfer, code: common_pb2.CodeRef
) -> list[agent_pb2.JobUpdate]:
    """Runs one job (NullRuntime) through a JobRunner; returns the updates it sent."""
    outbox = Outbox()
    deps = RunnerDeps(
        jobs_dir=tmp_path / "jobs",
        runtime=NullRuntime(),
        code=cache,
        outbox=outbox,
        uploader=Uploader(stub, list, RetryPolicy(), transfer),
        downloader=Downloader(stub, list, RetryPolicy(), transfer),
        gpu_uuids=lambda _: [],
        gpus_simulated=False,
        janitor=Janitor(),
        mount_sync_s=10.0,
        agent_home=str(tmp_path),
    )
    assignment = agent_pb2.JobAssignment(job_id="j1", code=code)

    async def run() -> list[agent_pb2.JobUpdate]:
        await JobRunner(deps, assignment).start()
        updates: list[agent_pb2.JobUpdate] = []
        while (msg := outbox.take()) is not None:
            updates.extend(msg.updates)
        return updates

    with transfer:
        return asyncio.run(run())


def test_access_denied_fails_the_job_at_once_with_the_store_s_reason(
    store: tuple[FakeStore, str], tmp_path: Path
) -> None:
    fake, base = store
    blob, h = code_blob()
    path = f"/dstack/code/{h}.tar.gz"
    fake.objects[path] = blob
    fake.script[("GET", path, "*")] = [(403, DENIED)] * 100
    cache, stub, transfer = code_cache(tmp_path, base, RetryPolicy())  # the agent's own 300 s deadline
    updates = _run_job(tmp_path, cache, stub, transfer, common_pb2.CodeRef(hash=h, size=len(blob)))
    failed = [u for u in updates if u.status == common_pb2.JobStatus.JOB_STATUS_FAILED]
    assert len(failed) == 1, updates
    reason = failed[0].message
    assert "HTTP 403 SignatureDoesNotMatch" in reason and "bucket 'dstack'" in reason, reason
    assert "access key 'AKID'" in reason and "check the coordinator's S3 credentials" in reason, reason
    assert failed[0].termination_reason == common_pb2.TERMINATION_REASON_EXECUTOR_ERROR
    assert fake.count("GET", path) == 1 and len(stub.grants) == 1  # not retried: refused for good


def test_a_hostile_code_archive_fails_the_job_with_the_member_named(
    store: tuple[FakeStore, str], tmp_path: Path
) -> None:
    fake, base = store
    blob, h = code_blob("../x")
    fake.objects[f"/dstack/code/{h}.tar.gz"] = blob
    cache, stub, transfer = code_cache(tmp_path, base, FAST)
    updates = _run_job(tmp_path, cache, stub, transfer, common_pb2.CodeRef(hash=h, size=len(blob)))
    failed = [u for u in updates if u.status == common_pb2.JobStatus.JOB_STATUS_FAILED]
    assert len(failed) == 1, updates
    assert failed[0].message == "code archive: member '../x' escapes the job folder"
    assert not (tmp_path / "jobs" / "x").exists() and not (tmp_path / "x").exists()


def test_an_expired_code_url_gets_a_fresh_grant(store: tuple[FakeStore, str], tmp_path: Path) -> None:
    fake, base = store
    blob, h = code_blob()
    path = f"/dstack/code/{h}.tar.gz"
    fake.objects[path] = blob
    fake.script[("GET", path, "1")] = [(403, EXPIRED)]  # the first grant's URL has run out
    cache, stub, transfer = code_cache(tmp_path, base, FAST)
    with transfer:
        asyncio.run(cache.materialize(common_pb2.CodeRef(hash=h, size=len(blob)), tmp_path / "job"))
    assert (tmp_path / "job" / "main.py").exists()
    assert len(stub.grants) == 2
    assert [g for m, p, g in fake.requests if p == path] == ["1", "2"]


def test_code_cache_error_names_the_refusal(store: tuple[FakeStore, str], tmp_path: Path) -> None:
    fake, base = store
    blob, h = code_blob()
    fake.script[("GET", f"/dstack/code/{h}.tar.gz", "*")] = [(404, b"<Error><Code>NoSuchBucket</Code></Error>")]
    cache, _, transfer = code_cache(tmp_path, base, FAST)
    with transfer, pytest.raises(CodeError, match=r"fetching code \w+ failed: .*HTTP 404 NoSuchBucket"):
        asyncio.run(cache.materialize(common_pb2.CodeRef(hash=h, size=len(blob)), tmp_path / "job"))


def test_uploads_whose_urls_expired_are_granted_again_and_only_they_are_sent_again(
    store: tuple[FakeStore, str], tmp_path: Path
) -> None:
    fake, base = store
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    for name in ("a", "b", "c"):
        (work / "out" / name).write_bytes(name.encode() * 1000)
    fake.script[("PUT", "/dstack/art/out/b", "1")] = [(403, EXPIRED)]
    stub = CoordinatorStub(base)
    with Transfer(backoff=FAST.backoff, retryable=FAST.retries_in_place) as transfer:
        uploader = Uploader(stub, list, FAST, transfer)
        n = asyncio.run(uploader.upload("j1", work, [common_pb2.ArtifactSpec(path="out")]))
    assert n == 3
    assert stub.granted_paths(1) == ["out/b"]  # the second grant: only the expired one
    for name in ("a", "b", "c"):
        assert fake.objects[f"/dstack/art/out/{name}"] == name.encode() * 1000
    assert fake.count("PUT", "/dstack/art/out/a") == 1 and fake.count("PUT", "/dstack/art/out/b") == 2
    (commit,) = stub.commits
    assert sorted(f.path for f in commit.files) == ["out/a", "out/b", "out/c"]


def dependency(fake: FakeStore, files: dict[str, bytes]) -> agent_pb2.ArtifactInput:
    for path, data in files.items():
        fake.objects[f"/dstack/runs/r1/{path}"] = data
    return agent_pb2.ArtifactInput(
        run_name="r1",
        job_name="download",
        files=[
            common_pb2.ArtifactFile(path=p, size=len(d), sha256=hashlib.sha256(d).hexdigest()) for p, d in files.items()
        ],
    )


def test_dependency_downloads_whose_urls_expired_are_granted_again(
    store: tuple[FakeStore, str], tmp_path: Path
) -> None:
    fake, base = store
    src = dependency(fake, {"data/x": b"x" * 100, "data/y": b"y" * 100})
    fake.script[("GET", "/dstack/runs/r1/data/x", "1")] = [(403, EXPIRED)]
    fake.script[("GET", "/dstack/runs/r1/data/y", "*")] = [(503, SLOW_DOWN)]  # retried in place, same URL
    stub = CoordinatorStub(base)
    with Transfer(backoff=FAST.backoff, retryable=FAST.retries_in_place) as transfer:
        n = asyncio.run(Downloader(stub, list, FAST, transfer).fetch([src], tmp_path))
    assert n == 2
    assert (tmp_path / "data" / "x").read_bytes() == b"x" * 100 and (tmp_path / "data" / "y").read_bytes() == b"y" * 100
    assert stub.granted_paths(1) == ["data/x"] and len(stub.grants) == 2


def test_a_denied_dependency_download_fails_at_once(store: tuple[FakeStore, str], tmp_path: Path) -> None:
    fake, base = store
    src = dependency(fake, {"data/x": b"x"})
    fake.script[("GET", "/dstack/runs/r1/data/x", "*")] = [(403, DENIED)] * 100
    stub = CoordinatorStub(base)
    with (
        Transfer(backoff=RetryPolicy().backoff, retryable=RetryPolicy().retries_in_place) as transfer,
        pytest.raises(ArtifactError, match=r"data/x \(from r1\): HTTP 403 SignatureDoesNotMatch"),
    ):
        asyncio.run(Downloader(stub, list, RetryPolicy(), transfer).fetch([src], tmp_path))
    assert fake.count("GET", "/dstack/runs/r1/data/x") == 1 and len(stub.grants) == 1
    assert not (tmp_path / "data" / "x").exists()
