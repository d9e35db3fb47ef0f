"""Repositories as namespaces, through the real ClientService: two repositories' `latest` never collide,
a run's tag and workflow dependencies resolve in its own repository, OWNER/REPO/NAME reaches another,
and what cannot be resolved is an error that says where it looked."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from dstack.protos.v1 import client_pb2, common_pb2
from tests.inproc.factories import Harness, coordinator, job_spec, sim_agent

A = "github.com/team/a"
B = "git.example.com/team/b"


async def publish(h: Harness, repository: str, tag: str, text: str, workflow: str = "download") -> str:
    """`dstack artifacts upload` of one file into `repository`, tagged; returns the run's name."""
    req = client_pb2.CreateUploadRequest(
        workflow=workflow,
        tag=tag,
        files=[common_pb2.FileSize(path="data.txt", size=len(text))],
        repository=repository,
    )
    up: client_pb2.CreateUploadResponse = await h.client.CreateUpload(req, metadata=h.meta)
    assert up.stream  # a folder store: the bytes go through the coordinator

    async def chunks() -> AsyncIterator[client_pb2.PutArtifactRequest]:
        yield client_pb2.PutArtifactRequest(run_name=up.run_name, path="data.txt", data=text.encode())

    await h.client.PutArtifact(chunks(), metadata=h.meta)
    digest = hashlib.sha256(text.encode()).hexdigest()
    files = [common_pb2.ArtifactFile(job_name=workflow, path="data.txt", size=len(text), sha256=digest)]
    done: client_pb2.CommitUploadResponse = await h.client.CommitUpload(
        client_pb2.CommitUploadRequest(run_name=up.run_name, files=files), metadata=h.meta
    )
    assert done.run.repository == repository
    return up.run_name


async def submit(h: Harness, repository: str, tags: list[str] = [], workflows: list[str] = []) -> client_pb2.Run:  # noqa: B006
    spec = job_spec("main")
    spec.input_tags.extend(tags)
    spec.input_workflows.extend(workflows)
    req = client_pb2.SubmitRunRequest(workflow="train", jobs=[spec], repository=repository)
    resp: client_pb2.SubmitRunResponse = await h.client.SubmitRun(req, metadata=h.meta)
    return resp.run


async def refused(h: Harness, repository: str, tags: list[str] = [], workflows: list[str] = []) -> grpc.aio.AioRpcError:  # noqa: B006
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await submit(h, repository, tags, workflows)
    return e.value


async def test_each_repository_resolves_its_own_tags_and_reaches_another_by_name(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h) as agent:
        a_run = await publish(h, A, "latest", "from a")
        b_run = await publish(h, B, "latest", "from b")  # the same tag in another repository: no conflict

        listed: client_pb2.ListTagsResponse = await h.client.ListTags(
            client_pb2.ListTagsRequest(repository=A), metadata=h.meta
        )
        assert [(t.name, t.run_name, t.repository) for t in listed.tags] == [("latest", a_run, A)]
        everything: client_pb2.ListTagsResponse = await h.client.ListTags(
            client_pb2.ListTagsRequest(all=True), metadata=h.meta
        )
        assert sorted((t.repository, t.run_name) for t in everything.tags) == sorted([(A, a_run), (B, b_run)])

        runs = [
            await submit(h, A, tags=["latest"]),
            await submit(h, B, tags=["latest"]),
            await submit(h, A, tags=["team/b/latest"]),  # OWNER/REPO/TAG: another repository's tag
            await submit(h, A, workflows=["team/b/download"]),  # its last done run of a workflow
            await submit(h, B, workflows=["download"]),
        ]
        assert [r.repository for r in runs] == [A, B, A, A, B]
        assignments = await agent.wait_assignments(len(runs))
        inputs = {a.run_name: [i.run_name for i in a.inputs] for a in assignments}
        assert [inputs[r.name] for r in runs] == [[a_run], [b_run], [b_run], [b_run], [b_run]]

        got: client_pb2.GetTagResponse = await h.client.GetTag(
            client_pb2.GetTagRequest(ref="team/a/latest", repository=B), metadata=h.meta
        )
        assert (got.tag.run_name, got.tag.repository) == (a_run, A)

        # deleting A's tag leaves B's
        await h.client.DeleteTag(client_pb2.DeleteTagRequest(tag="latest", repository=A), metadata=h.meta)
        everything = await h.client.ListTags(client_pb2.ListTagsRequest(all=True), metadata=h.meta)
        assert [(t.repository, t.run_name) for t in everything.tags] == [(B, b_run)]


async def test_unresolvable_dependencies_say_where_they_looked(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h:
        await publish(h, A, "latest", "a")
        await publish(h, B, "latest", "b")
        e = await refused(h, B, tags=["nightly"])
        assert e.code() == grpc.StatusCode.NOT_FOUND
        assert e.details() == f"tag 'nightly' does not exist in repository {B} (see `dstack tags list`)"
        e = await refused(h, "github.com/team/c", workflows=["download"])
        assert e.code() == grpc.StatusCode.NOT_FOUND
        assert "no run of workflow 'download' has finished done in repository github.com/team/c" in str(e.details())
        e = await refused(h, A, tags=["ghost/repo/latest"])
        assert e.code() == grpc.StatusCode.NOT_FOUND
        assert "no repository 'ghost/repo'" in str(e.details())
        e = await refused(h, A, tags=["team/a/"])
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT

        # the same OWNER/REPO on two hosts: refused, both named, and the whole name works
        await publish(h, "gitlab.com/team/b", "latest", "impostor")
        e = await refused(h, A, tags=["team/b/latest"])
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert B in str(e.details()) and "gitlab.com/team/b" in str(e.details())
        assert (await submit(h, A, tags=[f"{B}/latest"])).repository == A

        # nothing was stored by the refused submissions
        listed: client_pb2.ListRunsResponse = await h.client.ListRuns(
            client_pb2.ListRunsRequest(all=True), metadata=h.meta
        )
        assert sorted(r.workflow for r in listed.runs) == ["download", "download", "download", "train"]


async def test_a_folder_repository_belongs_to_its_user(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h:
        run = await submit(h, "local/app")
        assert run.repository == "local/admin/app"
        # a client cannot write into another user's folder namespace, nor name a bare host
        for bad in ("local/bob/app", "github.com", "a/../b"):
            e = await refused(h, bad)
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        # a client from before repositories: the code's remote names it, else legacy
        req = client_pb2.SubmitRunRequest(
            workflow="w", jobs=[job_spec()], code=common_pb2.CodeRef(repo_url="git@github.com:Team/A.git")
        )
        resp: client_pb2.SubmitRunResponse = await h.client.SubmitRun(req, metadata=h.meta)
        assert resp.run.repository == A
        req = client_pb2.SubmitRunRequest(workflow="w", jobs=[job_spec()])
        resp = await h.client.SubmitRun(req, metadata=h.meta)
        assert resp.run.repository == "legacy"
