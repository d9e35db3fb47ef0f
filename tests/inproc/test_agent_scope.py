"""Least privilege for agents (coordinator/app/agent_scope.py): an agent with a valid identity
touches only its own running jobs, their code and their declared inputs.

A victim agent runs a two-job run (`build`, then `train` which depends on it); a rogue agent,
registered with the same join token, tries every AgentService call on that run, and sends lines
and updates for the victim's job and for a job that does not exist."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest

from dstack.coordinator.app import agent_scope
from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, client_pb2, common_pb2
from tests.inproc.factories import (
    JS,
    TR,
    Harness,
    SimAgent,
    coordinator,
    job_ids,
    job_spec,
    sim_agent,
    submit_run,
    wait_until,
)

pytestmark = pytest.mark.inproc

CODE = b"a packed working tree, as far as the coordinator cares"
CODE_HASH = hashlib.sha256(CODE).hexdigest()
DENIED = grpc.StatusCode.PERMISSION_DENIED


def stub(h: Harness, agent: SimAgent) -> tuple[agent_pb2_grpc.AgentServiceStub, list[tuple[str, str]]]:
    return agent_pb2_grpc.AgentServiceStub(h.channel), [("authorization", f"Bearer {agent.token}")]


async def put_code(h: Harness) -> common_pb2.CodeRef:
    async def chunks() -> AsyncIterator[client_pb2.PutCodeRequest]:
        yield client_pb2.PutCodeRequest(hash=CODE_HASH, size=len(CODE), data=CODE)

    await h.client.PutCode(chunks(), metadata=h.meta)
    return common_pb2.CodeRef(hash=CODE_HASH, size=len(CODE))


async def submit(h: Harness, code: common_pb2.CodeRef, *jobs: common_pb2.JobSpec) -> client_pb2.Run:
    req = client_pb2.SubmitRunRequest(workflow="w", jobs=list(jobs), code=code)
    resp: client_pb2.SubmitRunResponse = await h.client.SubmitRun(req, metadata=h.meta)
    return resp.run


async def get_code(h: Harness, agent: SimAgent, code_hash: str = CODE_HASH) -> bytes:
    s, meta = stub(h, agent)
    return b"".join([c.data async for c in s.GetCode(agent_pb2.GetCodeRequest(hash=code_hash), metadata=meta)])


async def download(h: Harness, agent: SimAgent, run: str, job: str, path: str) -> bytes:
    s, meta = stub(h, agent)
    req = client_pb2.DownloadArtifactRequest(run_name=run, job_name=job, path=path)
    return b"".join([c.data async for c in s.DownloadArtifact(req, metadata=meta)])


async def upload(h: Harness, agent: SimAgent, job_id: str, path: str, data: bytes) -> None:
    s, meta = stub(h, agent)

    async def chunks() -> AsyncIterator[agent_pb2.UploadArtifactRequest]:
        yield agent_pb2.UploadArtifactRequest(job_id=job_id, path=path, data=data)

    await s.UploadArtifact(chunks(), metadata=meta)


async def save_artifact(h: Harness, agent: SimAgent, job_id: str, path: str, data: bytes) -> None:
    await upload(h, agent, job_id, path, data)
    s, meta = stub(h, agent)
    f = common_pb2.ArtifactFile(path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    await s.CommitArtifacts(agent_pb2.CommitArtifactsRequest(job_id=job_id, files=[f]), metadata=meta)


async def denied(call: object, what: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call  # type: ignore[misc]
    assert e.value.code() == DENIED, f"{what}: {e.value.code()} {e.value.details()}"


async def stored_lines(h: Harness, job_id: str) -> list[str]:
    engine = h.coordinator.engine
    return [ln.text for ln in await engine.db(engine.store.all_logs, job_id)]


def with_artifacts(spec: common_pb2.JobSpec, *paths: str) -> common_pb2.JobSpec:
    spec.artifacts.extend(common_pb2.ArtifactSpec(path=p) for p in paths)
    return spec


async def build_then_train(h: Harness, victim: SimAgent) -> tuple[client_pb2.Run, dict[str, str]]:
    """A run whose `build` saved out/model.bin and whose `train` (which takes it) runs on the victim."""
    code = await put_code(h)
    train = job_spec("train")
    train.depends_on.append("build")
    run = await submit(h, code, with_artifacts(job_spec("build"), "out"), train)
    ids = job_ids(run)
    await victim.wait_assignments(1)
    await victim.report(ids["build"], JS.JOB_STATUS_RUNNING)
    await save_artifact(h, victim, ids["build"], "out/model.bin", b"weights")
    await victim.report(ids["build"], JS.JOB_STATUS_DONE, TR.TERMINATION_REASON_DONE)
    await victim.wait_assignments(2)
    await victim.report(ids["train"], JS.JOB_STATUS_RUNNING)
    return run, ids


async def test_a_rogue_agent_gets_no_code_grant_or_artifact_of_another_agents_run(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h, "victim") as victim:
        run, ids = await build_then_train(h, victim)
        # The victim itself may: its running job's code, and the artifacts of the job it depends on.
        assert await get_code(h, victim) == CODE
        assert await download(h, victim, run.name, "build", "out/model.bin") == b"weights"
        s, meta = stub(h, victim)
        await s.GrantCode(agent_pb2.GetCodeRequest(hash=CODE_HASH), metadata=meta)
        files = [client_pb2.DownloadArtifactRequest(run_name=run.name, job_name="build", path="out/model.bin")]
        await s.GrantDownloads(agent_pb2.GrantDownloadsRequest(files=files), metadata=meta)

        async with sim_agent(h, "rogue") as rogue:
            r, rmeta = stub(h, rogue)
            await denied(get_code(h, rogue), "GetCode")
            await denied(r.GrantCode(agent_pb2.GetCodeRequest(hash=CODE_HASH), metadata=rmeta), "GrantCode")
            await denied(download(h, rogue, run.name, "build", "out/model.bin"), "DownloadArtifact")
            await denied(
                r.GrantDownloads(agent_pb2.GrantDownloadsRequest(files=files), metadata=rmeta), "GrantDownloads"
            )
            # Nor can it write into the victim's job: no upload, no grant, no commit.
            await denied(upload(h, rogue, ids["train"], "out/evil.bin", b"evil"), "UploadArtifact")
            grant = agent_pb2.GrantUploadsRequest(job_id=ids["train"], files=[common_pb2.FileSize(path="x", size=1)])
            await denied(r.GrantUploads(grant, metadata=rmeta), "GrantUploads")
            commit = agent_pb2.CommitArtifactsRequest(
                job_id=ids["train"], files=[common_pb2.ArtifactFile(path="x", size=1, sha256="0" * 64)]
            )
            await denied(r.CommitArtifacts(commit, metadata=rmeta), "CommitArtifacts")
            # A finished job is nobody's any more: not even its own agent's.
            await denied(upload(h, victim, ids["build"], "out/late.bin", b"late"), "upload into a finished job")
            # A job that does not exist reads the same as another agent's.
            await denied(upload(h, rogue, "no-such-job", "x", b"x"), "upload into a job that does not exist")


async def test_an_agent_reads_only_the_declared_inputs_of_its_own_jobs(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h, "victim") as victim:
        run, ids = await build_then_train(h, victim)
        await victim.report(ids["train"], JS.JOB_STATUS_DONE, TR.TERMINATION_REASON_DONE)
        # Its job finished: the code and the inputs of that job are no longer the agent's.
        await denied(get_code(h, victim), "GetCode after the job finished")
        await denied(download(h, victim, run.name, "build", "out/model.bin"), "inputs after the job finished")

        # A run that takes the first one's artifacts through a tag: its agent may read them (every
        # job of the tagged run), and nothing else.
        await h.client.AddTag(client_pb2.AddTagRequest(tag="v1", run_name=run.name), metadata=h.meta)
        other = await submit_run(h, with_artifacts(job_spec("secret-job"), "out"))
        await victim.wait_assignments(3)
        secret_id = job_ids(other)["secret-job"]
        await victim.report(secret_id, JS.JOB_STATUS_RUNNING)
        await save_artifact(h, victim, secret_id, "out/private.txt", b"private")
        await victim.report(secret_id, JS.JOB_STATUS_DONE, TR.TERMINATION_REASON_DONE)

        evaluate = job_spec("eval")
        evaluate.input_tags.append("v1")
        await submit_run(h, evaluate)
        await victim.wait_assignments(4)
        assert await download(h, victim, run.name, "build", "out/model.bin") == b"weights"
        await denied(download(h, victim, other.name, "secret-job", "out/private.txt"), "an artifact of no input")
        s, meta = stub(h, victim)
        mixed = [
            client_pb2.DownloadArtifactRequest(run_name=run.name, job_name="build", path="out/model.bin"),
            client_pb2.DownloadArtifactRequest(run_name=other.name, job_name="secret-job", path="out/private.txt"),
        ]
        await denied(s.GrantDownloads(agent_pb2.GrantDownloadsRequest(files=mixed), metadata=meta), "one bad file")


async def test_forged_lines_and_updates_are_dropped_and_never_replace_the_real_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_scope, "DROP_LOG_INTERVAL_S", 0.0)  # every drop logged (the rate limit: tests/unit)
    async with coordinator(tmp_path) as h, sim_agent(h, "victim") as victim:
        run, ids = await build_then_train(h, victim)
        train = ids["train"]
        await victim.log(train, 1, "real 1")
        async with sim_agent(h, "rogue") as rogue:
            with caplog.at_level(logging.WARNING, logger="dstack.coordinator"):
                # Lines the victim already sent, lines it has yet to send, and a final status.
                await rogue.log(train, 1, "forged 1", "forged 2", "forged 3")
                await rogue.report(train, JS.JOB_STATUS_FAILED, TR.TERMINATION_REASON_EXIT_CODE)
                # And lines of a job that does not exist, in its hello too.
                await rogue.log("no-such-job", 1, "ghost")
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any(rogue.agent_id in w and train in w and "log line" in w for w in warnings), warnings
            assert any(rogue.agent_id in w and train in w and "status update" in w for w in warnings), warnings
            assert any(rogue.agent_id in w and "no-such-job" in w for w in warnings), warnings
            await rogue.disconnect()
            ghost = agent_pb2.LogBatch(job_id="ghost-2", lines=[common_pb2.LogLine(seq=1, text="ghost in hello")])
            reply = await reconnect_with(rogue, [ghost])
            assert [(a.job_id, a.seq) for a in reply.log_acks] == [("ghost-2", 1)]

        await victim.log(train, 2, "real 2", "real 3")
        assert (await h.job(run.name, "train")).status == JS.JOB_STATUS_RUNNING
        assert await stored_lines(h, train) == ["real 1", "real 2", "real 3"]
        assert await stored_lines(h, "no-such-job") == []
        assert await stored_lines(h, "ghost-2") == []
        await victim.report(train, JS.JOB_STATUS_DONE, TR.TERMINATION_REASON_DONE)
        assert [t for _, _, t in await h.logs(run.name)] == ["real 1", "real 2", "real 3"]
        # Once the job is finished, its own agent cannot add to it either.
        await victim.log(train, 4, "late")
        assert await stored_lines(h, train) == ["real 1", "real 2", "real 3"]


async def reconnect_with(agent: SimAgent, logs: Sequence[agent_pb2.LogBatch]) -> agent_pb2.CoordinatorMessage:
    """A hello that carries log batches (what an agent kept while it could not reach us)."""
    s, meta = stub(agent.h, agent)
    call = s.Connect(metadata=meta)
    hello = agent_pb2.Hello(agent_id=agent.agent_id)
    await call.write(agent_pb2.AgentMessage(hello=hello, logs=list(logs)))
    first: agent_pb2.CoordinatorMessage = await call.read()
    call.cancel()
    return first


ACTING = [JS.JOB_STATUS_ASSIGNED, JS.JOB_STATUS_PULLING, JS.JOB_STATUS_RUNNING, JS.JOB_STATUS_UPLOADING]
FINISHED = [JS.JOB_STATUS_DONE, JS.JOB_STATUS_FAILED]


@pytest.mark.parametrize("status", ACTING + FINISHED, ids=lambda s: JS.Name(s))
async def test_an_agent_acts_on_its_job_exactly_while_the_job_may_still_act(
    tmp_path: Path, status: common_pb2.JobStatus.ValueType
) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h, "agent") as agent:
        code = await put_code(h)
        run = await submit(h, code, with_artifacts(job_spec("main"), "out"))
        job_id = job_ids(run)["main"]
        await agent.wait_assignments(1)
        path = {
            JS.JOB_STATUS_ASSIGNED: [],
            JS.JOB_STATUS_PULLING: [JS.JOB_STATUS_PULLING],
            JS.JOB_STATUS_RUNNING: [JS.JOB_STATUS_RUNNING],
            JS.JOB_STATUS_UPLOADING: [JS.JOB_STATUS_RUNNING, JS.JOB_STATUS_UPLOADING],
            JS.JOB_STATUS_DONE: [JS.JOB_STATUS_RUNNING, JS.JOB_STATUS_DONE],
            JS.JOB_STATUS_FAILED: [JS.JOB_STATUS_RUNNING, JS.JOB_STATUS_FAILED],
        }[status]
        for step in path:
            await agent.report(job_id, step)
        assert (await h.job(run.name, "main")).status == status
        s, meta = stub(h, agent)
        grant = agent_pb2.GrantUploadsRequest(job_id=job_id, files=[common_pb2.FileSize(path="out/a", size=1)])
        await agent.log(job_id, 1, "a line")
        if status in ACTING:
            assert await get_code(h, agent) == CODE
            await s.GrantUploads(grant, metadata=meta)
            await upload(h, agent, job_id, "out/a", b"a")
            assert await stored_lines(h, job_id) == ["a line"]
        else:
            await denied(get_code(h, agent), "GetCode")
            await denied(s.GrantUploads(grant, metadata=meta), "GrantUploads")
            await denied(upload(h, agent, job_id, "out/a", b"a"), "UploadArtifact")
            assert await stored_lines(h, job_id) == []


async def test_a_workflow_input_is_readable_by_the_job_that_takes_it_only(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h, "agent") as agent:
        source = await submit_run(h, with_artifacts(job_spec("prepare"), "data"))
        prepare = job_ids(source)["prepare"]
        await agent.wait_assignments(1)
        await agent.report(prepare, JS.JOB_STATUS_RUNNING)
        await save_artifact(h, agent, prepare, "data/x.csv", b"x")
        await agent.report(prepare, JS.JOB_STATUS_DONE, TR.TERMINATION_REASON_DONE)
        # A job that takes the latest done run of workflow "w" (the source's).
        taker = job_spec("taker")
        taker.input_workflows.append("w")
        await submit_run(h, taker)
        await agent.wait_assignments(2)
        assert await download(h, agent, source.name, "prepare", "data/x.csv") == b"x"
        # Another job name in the same run, which does not exist: refused like anything else.
        await denied(download(h, agent, source.name, "other", "data/x.csv"), "a job the run does not have")


async def test_a_rogue_hello_that_claims_another_agents_job_changes_nothing_of_it(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h, "victim") as victim:
        run, ids = await build_then_train(h, victim)
        train = ids["train"]
        await victim.log(train, 1, "real 1")
        async with sim_agent(h, "rogue") as rogue:
            reply = await rogue.connect(active=[train])
            # Told to drop what is not its own; no log position of the victim's job leaks to it.
            assert [(s.job_id, s.abort) for s in reply.stops] == [(train, True)]
            assert list(reply.hello_ack.log_positions) == []
        await victim.log(train, 2, "real 2")
        await victim.report(train, JS.JOB_STATUS_DONE, TR.TERMINATION_REASON_DONE)
        assert await stored_lines(h, train) == ["real 1", "real 2"]
        assert (await h.job(run.name, "train")).status == JS.JOB_STATUS_DONE


async def test_no_agent_adds_lines_to_an_attempt_ended_by_its_agents_loss(tmp_path: Path) -> None:
    lease_s = 5.0
    async with coordinator(tmp_path, lease_timeout_s=lease_s) as h, sim_agent(h, "a", cpu=1) as a:
        spec = job_spec("main", "train")
        spec.retry.CopyFrom(common_pb2.RetryPolicy(limit=1, on=["agent-lost"]))
        run = await submit_run(h, spec)
        job_id = job_ids(run)["main"]
        await a.wait_assignments(1)
        await a.report(job_id, JS.JOB_STATUS_RUNNING)
        await a.log(job_id, 1, "attempt 1")
        async with sim_agent(h, "b", cpu=1) as b, sim_agent(h, "rogue", cpu=0) as rogue:
            await h.clock.advance(lease_s - 0.5)
            at = h.clock.time_ns()
            await b.heartbeat()
            await rogue.heartbeat()
            await wait_until(lambda: _renewed(h, "b", at), "b's heartbeat stored")
            await wait_until(lambda: _renewed(h, "rogue", at), "the rogue's heartbeat stored")
            await h.clock.advance(1.0)  # a's lease ran out: attempt 2 goes to b
            (second,) = await b.wait_assignments(1)
            # The rogue writes into neither attempt: not the ended one of a, not the current one of b.
            await rogue.log(job_id, 2, "FORGED into attempt 1")
            await rogue.log(second.job_id, 1, "FORGED into attempt 2")
            # a, back, is fenced off too: its attempt was closed when it was declared lost, so its late
            # lines come from a process the coordinator gave up on (refused, and acknowledged so that
            # it stops resending them). b writes its own.
            await a.connect(active=[job_id])
            await a.log(job_id, 2, "attempt 1, late")
            await a.until(lambda: a.log_acks().get(job_id) == 2, "a's late line acknowledged")
            await b.report(second.job_id, JS.JOB_STATUS_RUNNING)
            await b.log(second.job_id, 1, "attempt 2")
            texts = [t for _, _, t in await h.logs(run.name)]
            assert texts == ["attempt 1", "attempt 2"], texts


async def _renewed(h: Harness, name: str, at: int) -> bool:
    agent = await h.agent(name)
    return agent is not None and agent.last_heartbeat_ns >= at


def count_scope_trips(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records each awaited scope check (agent_scope.reportable: a DB trip of its own)."""
    trips: list[str] = []
    reportable = agent_scope.reportable

    async def counted(*args: object) -> tuple[set[str], set[str]]:
        trips.append("reportable")
        return await reportable(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(agent_scope, "reportable", counted)
    return trips


async def test_one_message_of_lines_for_its_own_job_and_a_victims_stores_only_its_own_in_one_db_trip(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A message of log lines alone is checked on the DB thread in the call that stores it (one trip, not
    # two: coordinator/app/agent_stream.py). The attack: a rogue with a job of its own packs, in one
    # message, a batch for its job and a batch for the victim's, hoping the check sees only the first.
    monkeypatch.setattr(agent_scope, "DROP_LOG_INTERVAL_S", 0.0)
    trips = count_scope_trips(monkeypatch)  # must stay empty: lines alone are checked in their insert's trip
    async with coordinator(tmp_path) as h, sim_agent(h, "victim", cpu=1) as victim:
        _, ids = await build_then_train(h, victim)  # the victim is full: the rogue's own job goes to it
        train = ids["train"]
        await victim.log(train, 1, "real 1")
        async with sim_agent(h, "rogue") as rogue:
            own_run = await submit(h, await put_code(h), job_spec("own"))
            own = job_ids(own_run)["own"]
            await rogue.wait_assignments(1)
            await rogue.report(own, JS.JOB_STATUS_RUNNING)
            trips.clear()
            with caplog.at_level(logging.WARNING, logger="dstack.coordinator"):
                line = common_pb2.LogLine
                await rogue.send(
                    agent_pb2.AgentMessage(
                        logs=[
                            agent_pb2.LogBatch(job_id=own, lines=[line(seq=1, text="mine")]),
                            agent_pb2.LogBatch(job_id=train, lines=[line(seq=2, text="forged 2")]),
                        ]
                    )
                )
                # Both acknowledged: its own as stored, the victim's as dropped (so an honest agent that
                # lost a job stops resending its lines).
                await rogue.until(lambda: rogue.log_acks() == {own: 1, train: 2}, "both batches acknowledged")
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any(rogue.agent_id in w and train in w and "log line" in w for w in warnings), warnings
            assert trips == []  # checked within the insert's own trip
        assert await stored_lines(h, own) == ["mine"]
        assert await stored_lines(h, train) == ["real 1"]
        await victim.log(train, 2, "real 2")
        assert await stored_lines(h, train) == ["real 1", "real 2"]


async def test_one_message_of_updates_for_its_own_job_and_a_victims_applies_only_its_own_in_its_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A message with updates is screened in its report batch's own store call (coordinator/reports.py), not
    # in a DB trip of its own first. The attack: a rogue with a job of its own packs, in one message, its
    # job's RUNNING and DONE and the victim's job's FAILED, each with an environment (and lines of both),
    # hoping that what is checked and what is applied differ.
    monkeypatch.setattr(agent_scope, "DROP_LOG_INTERVAL_S", 0.0)
    trips = count_scope_trips(monkeypatch)  # must stay empty: updates are checked in their batch's call
    async with coordinator(tmp_path) as h, sim_agent(h, "victim", cpu=1) as victim:
        run, ids = await build_then_train(h, victim)  # the victim is full: the rogue's own job goes to it
        train = ids["train"]
        engine = h.coordinator.engine
        async with sim_agent(h, "rogue") as rogue:
            own_run = await submit(h, await put_code(h), job_spec("own"))
            own = job_ids(own_run)["own"]
            await rogue.wait_assignments(1)
            trips.clear()
            env = common_pb2.JobEnvironment(runtime="null", os="forged os")
            done, failed = TR.TERMINATION_REASON_DONE, TR.TERMINATION_REASON_EXIT_CODE
            line = common_pb2.LogLine
            with caplog.at_level(logging.WARNING, logger="dstack.coordinator"):
                await rogue.send(
                    agent_pb2.AgentMessage(
                        logs=[
                            agent_pb2.LogBatch(job_id=own, lines=[line(seq=1, text="mine")]),
                            agent_pb2.LogBatch(job_id=train, lines=[line(seq=2, text="forged 2")]),
                        ],
                        updates=[
                            agent_pb2.JobUpdate(job_id=own, status=JS.JOB_STATUS_RUNNING),
                            agent_pb2.JobUpdate(
                                job_id=train, status=JS.JOB_STATUS_FAILED, termination_reason=failed, environment=env
                            ),
                            agent_pb2.JobUpdate(
                                job_id=own, status=JS.JOB_STATUS_DONE, termination_reason=done, environment=env
                            ),
                        ],
                    )
                )
                # Every update acknowledged: its own as applied, the victim's as dropped (an honest agent
                # that lost a job stops resending its updates).
                await rogue.until(
                    lambda: {(own, JS.JOB_STATUS_DONE), (train, JS.JOB_STATUS_FAILED)} <= rogue.update_acks(),
                    "every update acknowledged",
                )
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any(rogue.agent_id in w and train in w and "status update" in w for w in warnings), warnings
            assert any(rogue.agent_id in w and train in w and "log line" in w for w in warnings), warnings
            assert trips == []  # screened in the batch's own call, and the lines in their insert's
        assert (await h.job(own_run.name, "own")).status == JS.JOB_STATUS_DONE
        assert (await h.job(run.name, "train")).status == JS.JOB_STATUS_RUNNING
        assert await stored_lines(h, own) == ["mine"]
        assert await stored_lines(h, train) == []
        runs = await engine.db(engine.store.run_ids_of_jobs, [train, own])
        assert (train, "environment") not in await engine.db(engine.store.records.of_run, runs[train])
        assert (await engine.db(engine.store.records.of_run, runs[own]))[(own, "environment")]["os"] == "forged os"
        await victim.report(train, JS.JOB_STATUS_DONE, TR.TERMINATION_REASON_DONE)
        assert (await h.job(run.name, "train")).status == JS.JOB_STATUS_DONE


async def test_an_agent_s_own_final_keeps_its_environment_in_the_run_s_record(tmp_path: Path) -> None:
    # The environment of an agent's own job, reported with its final update, is written in the update's batch
    # (coordinator/reports.py): before, in a store call of its own.
    async with coordinator(tmp_path) as h, sim_agent(h, "agent") as agent:
        run = await submit_run(h, job_spec("main"))
        job = job_ids(run)["main"]
        await agent.wait_assignments(1)
        env = common_pb2.JobEnvironment(runtime="null", python_version="3.11.7", packages="numpy==2.0.0")
        await agent.send(
            agent_pb2.AgentMessage(
                updates=[
                    agent_pb2.JobUpdate(job_id=job, status=JS.JOB_STATUS_RUNNING),
                    agent_pb2.JobUpdate(
                        job_id=job,
                        status=JS.JOB_STATUS_DONE,
                        termination_reason=TR.TERMINATION_REASON_DONE,
                        environment=env,
                    ),
                ]
            )
        )
        await agent.until(lambda: (job, JS.JOB_STATUS_DONE) in agent.update_acks(), "the final acknowledged")
        engine = h.coordinator.engine
        run_id = (await engine.db(engine.store.run_ids_of_jobs, [job]))[job]
        part = (await engine.db(engine.store.records.of_run, run_id))[(job, "environment")]
        assert part["python_version"] == "3.11.7" and "numpy==2.0.0" in str(part["packages"])
        assert (await h.job(run.name, "main")).status == JS.JOB_STATUS_DONE
