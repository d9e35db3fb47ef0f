"""Users and roles through the real ClientService: which role may make which call, who may change
which run, what a job's secrets are for each owner, and that a revoked token is refused at once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from dstack.protos.v1 import client_pb2
from tests.inproc.factories import (
    ADMIN,
    JS,
    Harness,
    coordinator,
    job_ids,
    job_spec,
    sim_agent,
)

pytestmark = pytest.mark.inproc
PD = grpc.StatusCode.PERMISSION_DENIED


def meta(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def add_user(h: Harness, name: str, role: str = "") -> str:
    resp: client_pb2.AddUserResponse = await h.client.AddUser(
        client_pb2.AddUserRequest(name=name, role=role), metadata=h.meta
    )
    assert resp.user.name == name and resp.user.role == (role or "member")
    return resp.token


async def refused(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    return e.value.code(), e.value.details() or ""


async def submit_as(h: Harness, token: str, *commands: str) -> client_pb2.Run:
    req = client_pb2.SubmitRunRequest(workflow="w", jobs=[job_spec("main", *commands)])
    resp: client_pb2.SubmitRunResponse = await h.client.SubmitRun(req, metadata=meta(token))
    return resp.run


async def test_each_role_may_make_only_its_calls(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h:
        c = h.client
        alice, vera = await add_user(h, "alice"), await add_user(h, "vera", "viewer")

        info: client_pb2.GetInfoResponse = await c.GetInfo(client_pb2.GetInfoRequest(), metadata=meta(vera))
        assert (info.user, info.role) == ("vera", "viewer")
        info = await c.GetInfo(client_pb2.GetInfoRequest(), metadata=h.meta)
        assert (info.user, info.role) == ("admin", "admin")

        run = await submit_as(h, alice)
        # A viewer reads everything...
        reads: list[Callable[[], Awaitable[Any]]] = [
            lambda: c.ListRuns(client_pb2.ListRunsRequest(), metadata=meta(vera)),
            lambda: c.GetRun(client_pb2.GetRunRequest(name=run.name), metadata=meta(vera)),
            lambda: c.ListAgents(client_pb2.ListAgentsRequest(), metadata=meta(vera)),
            lambda: c.ListTags(client_pb2.ListTagsRequest(), metadata=meta(vera)),
            lambda: c.ListSecrets(client_pb2.ListSecretsRequest(), metadata=meta(vera)),
            lambda: c.ListUsers(client_pb2.ListUsersRequest(), metadata=meta(vera)),
            lambda: c.ListArtifacts(client_pb2.ListArtifactsRequest(run_name=run.name), metadata=meta(vera)),
        ]
        for read in reads:
            await read()
        async for _ in c.StreamLogs(client_pb2.StreamLogsRequest(run_name=run.name), metadata=meta(vera)):
            pass
        # ...and changes nothing, told which role it would need.
        code, details = await refused(
            c.SubmitRun(client_pb2.SubmitRunRequest(workflow="w", jobs=[job_spec()]), metadata=meta(vera))
        )
        assert (code, details) == (PD, "SubmitRun needs the member role; you are a viewer (user vera)")
        code, details = await refused(
            c.AddSecret(client_pb2.AddSecretRequest(name="X", value="vvvv", personal=True), metadata=meta(vera))
        )
        assert (code, details) == (PD, "AddSecret needs the member role; you are a viewer (user vera)")

        # A member manages no users, agents, join tokens or team secrets.
        admin_calls: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("AddUser", lambda: c.AddUser(client_pb2.AddUserRequest(name="eve"), metadata=meta(alice))),
            ("RemoveUser", lambda: c.RemoveUser(client_pb2.RemoveUserRequest(name="vera"), metadata=meta(alice))),
            ("CreateJoinToken", lambda: c.CreateJoinToken(client_pb2.CreateJoinTokenRequest(), metadata=meta(alice))),
            ("RemoveAgent", lambda: c.RemoveAgent(client_pb2.RemoveAgentRequest(name="x"), metadata=meta(alice))),
        ]
        for method, call in admin_calls:
            assert await refused(call()) == (PD, f"{method} needs the admin role; you are a member (user alice)")
        # Another user's token: admins only (the use case says so; one's own is allowed below).
        code, details = await refused(
            c.RotateUserToken(client_pb2.RotateUserTokenRequest(name="vera"), metadata=meta(alice))
        )
        assert code == PD and details.startswith("rotating vera's token needs the admin role; you are a member"), (
            details
        )
        code, details = await refused(
            c.AddSecret(client_pb2.AddSecretRequest(name="X", value="team-value"), metadata=meta(alice))
        )
        assert code == PD and details.startswith("adding a team secret needs the admin role; you are a member")
        assert "--personal" in details
        code, details = await refused(c.DeleteSecret(client_pb2.DeleteSecretRequest(name="X"), metadata=meta(alice)))
        assert code == PD and "deleting a team secret needs the admin role" in details
        listed: client_pb2.ListUsersResponse = await c.ListUsers(client_pb2.ListUsersRequest(), metadata=h.meta)
        assert [(u.name, u.role) for u in listed.users] == [("admin", "admin"), ("alice", "member"), ("vera", "viewer")]


async def test_only_the_owner_or_an_admin_changes_a_run(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h) as agent:
        c = h.client
        alice, bob = await add_user(h, "alice"), await add_user(h, "bob")
        run = await submit_as(h, alice)
        assert run.owner == "alice"
        [assigned] = await agent.wait_assignments(1)

        code, details = await refused(c.StopRun(client_pb2.StopRunRequest(name=run.name), metadata=meta(bob)))
        assert (code, details) == (PD, f"only the owner (alice) or an admin can stop run {run.name}; you are bob")
        assert (await h.job(run.name)).status == JS.JOB_STATUS_ASSIGNED  # untouched
        await c.StopRun(client_pb2.StopRunRequest(name=run.name), metadata=meta(alice))

        # A finished run: tagging and removing it are the owner's (or an admin's) too.
        done = await submit_as(h, alice)
        [_, second] = await agent.wait_assignments(2)
        for status in (JS.JOB_STATUS_RUNNING, JS.JOB_STATUS_DONE):
            await agent.report(second.job_id, status)
        await h.wait_job(done.name, "main", [JS.JOB_STATUS_DONE])
        code, details = await refused(
            c.AddTag(client_pb2.AddTagRequest(tag="best", run_name=done.name), metadata=meta(bob))
        )
        assert (code, details) == (PD, f"only the owner (alice) or an admin can tag run {done.name}; you are bob")
        await c.AddTag(client_pb2.AddTagRequest(tag="best", run_name=done.name), metadata=meta(alice))
        # `dstack run -t best` would move alice's tag to bob's run when it ends: refused at submission.
        steal = client_pb2.SubmitRunRequest(workflow="w", jobs=[job_spec()], tag_on_done="best")
        code, details = await refused(c.SubmitRun(steal, metadata=meta(bob)))
        assert (code, details) == (
            PD,
            f"only the owner (alice) or an admin can move tag best (of run {done.name}); you are bob",
        )
        code, details = await refused(c.DeleteTag(client_pb2.DeleteTagRequest(tag="best"), metadata=meta(bob)))
        assert code == PD and details.startswith("only the owner (alice) or an admin can delete tag best")
        await c.DeleteTag(client_pb2.DeleteTagRequest(tag="best"), metadata=h.meta)  # an admin may
        code, details = await refused(c.DeleteRun(client_pb2.DeleteRunRequest(name=done.name), metadata=meta(bob)))
        assert (code, details) == (PD, f"only the owner (alice) or an admin can remove run {done.name}; you are bob")
        await c.DeleteRun(client_pb2.DeleteRunRequest(name=done.name), metadata=h.meta)

        # Bob's own run is his to stop; an admin stops anyone's.
        bobs = await submit_as(h, bob)
        await c.StopRun(client_pb2.StopRunRequest(name=bobs.name), metadata=meta(bob))
        again = await submit_as(h, bob)
        await c.StopRun(client_pb2.StopRunRequest(name=again.name), metadata=h.meta)
        assert assigned.job_id == job_ids(run)["main"]

        # An upload is a run of its creator's: another member cannot commit files into it.
        up: client_pb2.CreateUploadResponse = await c.CreateUpload(
            client_pb2.CreateUploadRequest(workflow="data", tag="data1"), metadata=meta(alice)
        )
        code, details = await refused(
            c.CommitUpload(client_pb2.CommitUploadRequest(run_name=up.run_name), metadata=meta(bob))
        )
        assert code == PD and details.startswith("only the owner (alice) or an admin can add files to the upload")


async def test_a_job_gets_the_teams_secrets_and_its_owners_only(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h) as agent:
        c = h.client
        alice, bob = await add_user(h, "alice"), await add_user(h, "bob")

        async def put(token: str, name: str, value: str, personal: bool) -> None:
            req = client_pb2.AddSecretRequest(name=name, value=value, personal=personal)
            await c.AddSecret(req, metadata=meta(token))

        await put(ADMIN, "X", "team-x", False)
        await put(ADMIN, "TEAM_ONLY", "team-only", False)
        await put(alice, "X", "alice-x", True)
        await put(alice, "MINE", "alice-mine", True)
        await put(bob, "BOBS", "bob-own", True)

        async def secrets_of_job(token: str) -> dict[str, str]:
            n = len(agent.assignments())
            await submit_as(h, token)
            assignments = await agent.wait_assignments(n + 1)
            return dict(assignments[-1].secrets)

        assert await secrets_of_job(alice) == {"X": "alice-x", "TEAM_ONLY": "team-only", "MINE": "alice-mine"}
        assert await secrets_of_job(bob) == {"X": "team-x", "TEAM_ONLY": "team-only", "BOBS": "bob-own"}
        assert await secrets_of_job(ADMIN) == {"X": "team-x", "TEAM_ONLY": "team-only"}

        # Names only, the team's and the caller's own.
        listed: client_pb2.ListSecretsResponse = await c.ListSecrets(
            client_pb2.ListSecretsRequest(), metadata=meta(bob)
        )
        assert [(s.name, s.personal) for s in listed.secrets] == [("BOBS", True), ("TEAM_ONLY", False), ("X", False)]

        # After a restart (secrets decrypted from the database again) and alice's removal: the same split,
        # and her personal secrets are gone with her.
        await c.RemoveUser(client_pb2.RemoveUserRequest(name="alice"), metadata=h.meta)
        await h.stop()
        await h.start_again()
        await agent.connect()
        assert await secrets_of_job(bob) == {"X": "team-x", "TEAM_ONLY": "team-only", "BOBS": "bob-own"}
        ciphertexts = h.coordinator.engine.store.secret_ciphertexts()
        assert sorted((o, n) for o, n, _ in ciphertexts) == [("", "TEAM_ONLY"), ("", "X"), ("bob", "BOBS")]


async def test_a_removed_or_rotated_token_is_refused_on_the_next_call(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h) as agent:
        c = h.client
        carol = await add_user(h, "carol")
        list_runs = client_pb2.ListRunsRequest()
        for _ in range(3):  # cached by now
            await c.ListRuns(list_runs, metadata=meta(carol))
        rotated: client_pb2.RotateUserTokenResponse = await c.RotateUserToken(
            client_pb2.RotateUserTokenRequest(name="carol"), metadata=h.meta
        )
        code, details = await refused(c.ListRuns(list_runs, metadata=meta(carol)))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "invalid token" in details
        carol = rotated.token
        await c.ListRuns(list_runs, metadata=meta(carol))

        # A followed log stream of a user who is removed ends on its next message.
        run = await submit_as(h, carol)
        [assigned] = await agent.wait_assignments(1)
        await agent.report(assigned.job_id, JS.JOB_STATUS_RUNNING)
        await agent.log(assigned.job_id, 1, "one")
        stream = c.StreamLogs(client_pb2.StreamLogsRequest(run_name=run.name, follow=True), metadata=meta(carol))
        first = await stream.read()
        assert [ln.text for jl in first.jobs for ln in jl.lines] == ["one"]
        await c.RemoveUser(client_pb2.RemoveUserRequest(name="carol"), metadata=h.meta)
        await agent.log(assigned.job_id, 2, "two")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stream.read()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in (e.value.details() or "")
        code, _ = await refused(c.ListRuns(list_runs, metadata=meta(carol)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        # Her run stays, owned by her, and an admin can still stop it.
        await c.StopRun(client_pb2.StopRunRequest(name=run.name), metadata=h.meta)
        assert (await h.run(run.name)).owner == "carol"


async def test_user_management_refuses_what_would_lock_the_team_out(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h:
        c = h.client
        for name, role in (("Bad Name", ""), ("eve", "root")):
            code, _ = await refused(c.AddUser(client_pb2.AddUserRequest(name=name, role=role), metadata=h.meta))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
        await add_user(h, "dave", "admin")
        code, details = await refused(c.AddUser(client_pb2.AddUserRequest(name="dave"), metadata=h.meta))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        code, details = await refused(c.RemoveUser(client_pb2.RemoveUserRequest(name="admin"), metadata=h.meta))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "server's own token" in details
        code, _ = await refused(c.RemoveUser(client_pb2.RemoveUserRequest(name="nobody"), metadata=h.meta))
        assert code == grpc.StatusCode.NOT_FOUND
        await c.RemoveUser(client_pb2.RemoveUserRequest(name="dave"), metadata=h.meta)
        # The user list shows when each user was last seen, never a token.
        listed: client_pb2.ListUsersResponse = await c.ListUsers(client_pb2.ListUsersRequest(), metadata=h.meta)
        assert [u.name for u in listed.users] == ["admin"]
        assert listed.users[0].last_seen_at_ns > 0 and "token" not in str(listed).lower()


async def test_any_user_rotates_their_own_token_and_only_their_own(tmp_path: Path) -> None:
    """A token that leaked needs no admin: a viewer or member rotates their own; the old one is refused
    on the next call, and nobody but an admin rotates another user's."""
    async with coordinator(tmp_path) as h:
        c = h.client
        vera = await add_user(h, "vera", "viewer")
        bob = await add_user(h, "bob")
        list_runs = client_pb2.ListRunsRequest()
        for name, token in (("vera", vera), ("bob", bob)):
            new: client_pb2.RotateUserTokenResponse = await c.RotateUserToken(
                client_pb2.RotateUserTokenRequest(name=name), metadata=meta(token)
            )
            assert new.user.name == name and new.token != token
            code, details = await refused(c.ListRuns(list_runs, metadata=meta(token)))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "invalid token" in details
            await c.ListRuns(list_runs, metadata=meta(new.token))
            if name == "vera":
                vera = new.token
        code, details = await refused(
            c.RotateUserToken(client_pb2.RotateUserTokenRequest(name="bob"), metadata=meta(vera))
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED and "needs the admin role; you are a viewer" in details
        code, _ = await refused(c.RotateUserToken(client_pb2.RotateUserTokenRequest(name="admin"), metadata=meta(vera)))
        assert code == grpc.StatusCode.PERMISSION_DENIED
