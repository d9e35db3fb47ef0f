"""Attempts on the coordinator's clock: retries (agent lost, error), preemption, max_duration.

Scripted agents (SimAgent) play each side; the lease and max_duration checks run when the test
moves the manual clock."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from dstack.coordinator.attempts import SEQ_BITS
from dstack.protos.v1 import agent_pb2, client_pb2, common_pb2
from tests.inproc.factories import (
    JS,
    TR,
    Harness,
    SimAgent,
    coordinator,
    job_spec,
    sim_agent,
    submit_run,
    wait_until,
)

pytestmark = pytest.mark.inproc
LEASE_S = 5.0


def retrying(on: list[str], limit: int = 1, **fields: object) -> common_pb2.JobSpec:
    spec = job_spec("main", "train")
    spec.retry.CopyFrom(common_pb2.RetryPolicy(limit=limit, on=on))
    for k, v in fields.items():
        setattr(spec, k, v)
    return spec


def interruptible(spec: common_pb2.JobSpec) -> common_pb2.JobSpec:
    spec.resources.interruptible = True
    return spec


async def stored(h: Harness, agent: SimAgent) -> None:
    """A heartbeat from `agent`, stored (its lease renewed at the clock's time)."""
    at = h.clock.time_ns()
    await agent.heartbeat()

    async def renewed() -> bool:
        a = await h.agent(agent.name)
        return a is not None and a.last_heartbeat_ns >= at

    await wait_until(renewed, f"{agent.name}'s heartbeat to be stored")


async def preempt(h: Harness, run_name: str) -> int:
    resp: client_pb2.PreemptRunResponse = await h.client.PreemptRun(
        client_pb2.PreemptRunRequest(name=run_name), metadata=h.meta
    )
    return resp.preempted


def stops(agent: SimAgent) -> list[tuple[str, bool]]:
    return [(s.job_id, s.abort) for m in agent.received for s in m.stops]


async def test_a_job_lost_with_its_agent_is_a_new_attempt_on_another_agent_and_the_old_one_is_aborted(
    tmp_path: Path,
) -> None:
    async with (
        coordinator(tmp_path, lease_timeout_s=LEASE_S) as h,
        sim_agent(h, "a", cpu=1) as a,
    ):
        run = await submit_run(h, retrying(["agent-lost"]))
        (first,) = await a.wait_assignments(1)
        job_id = run.jobs[0].id
        assert first.job_id == job_id and first.env["DSTACK_ATTEMPT"] == "1"  # attempt 1 keeps the job's id
        await a.report(job_id, JS.JOB_STATUS_RUNNING)
        await a.log(job_id, 1, "epoch 1", "epoch 2")

        async with sim_agent(h, "b", cpu=1) as b:
            await h.clock.advance(LEASE_S - 0.5)
            await stored(h, b)
            await h.clock.advance(1.0)  # a's lease ran out, b's did not
            (second,) = await b.wait_assignments(1)
            assert second.job_id == f"{job_id}-a2" and second.env["DSTACK_ATTEMPT"] == "2"
            assert second.env["JOB_ID"] == job_id
            job = await h.job(run.name)
            assert job.attempt == 2 and job.agent_name == "b"
            (earlier,) = job.attempts
            assert (earlier.attempt, earlier.agent_name) == (1, "a")
            assert earlier.termination_reason == TR.TERMINATION_REASON_AGENT_LOST

            # The lost agent comes back still running attempt 1: it is told to abort it, and what it
            # reports about attempt 1 changes nothing.
            answer = await a.connect(active=[job_id])
            assert [(s.job_id, s.abort) for s in answer.stops] == [(job_id, True)]
            await a.report(job_id, JS.JOB_STATUS_DONE, TR.TERMINATION_REASON_DONE)
            await a.log(job_id, 3, "epoch 3 (late)")
            job = await h.job(run.name)
            assert job.status == JS.JOB_STATUS_ASSIGNED and job.agent_name == "b" and job.attempt == 2
            # Nor can it claim an attempt that does not exist.
            await a.report(f"{job_id}-a3", JS.JOB_STATUS_DONE, TR.TERMINATION_REASON_DONE)
            assert (await h.job(run.name)).status == JS.JOB_STATUS_ASSIGNED

            await b.report(second.job_id, JS.JOB_STATUS_RUNNING)
            await b.log(second.job_id, 1, "resumed")
            await b.report(second.job_id, JS.JOB_STATUS_DONE, TR.TERMINATION_REASON_DONE)
            await h.wait_job(run.name, "main", [JS.JOB_STATUS_DONE])
            # Each attempt's lines in its own range of seqs, in attempt order.
            lines = await h.logs(run.name)
            base = 1 << SEQ_BITS
            # (a's late line is refused: attempt 1 was closed when a was declared lost.)
            assert [(s, t) for _, s, t in lines] == [(1, "epoch 1"), (2, "epoch 2"), (base + 1, "resumed")]


async def test_without_retry_a_lost_agent_still_fails_its_job(tmp_path: Path) -> None:
    async with coordinator(tmp_path, lease_timeout_s=LEASE_S) as h, sim_agent(h, "a") as a:
        run = await submit_run(h, retrying(["error"]))  # retries errors, not lost agents
        await a.wait_assignments(1)
        await h.clock.advance(LEASE_S + 1)
        job = await h.wait_job(run.name, "main", [JS.JOB_STATUS_FAILED])
        assert job.termination_reason == TR.TERMINATION_REASON_AGENT_LOST and job.attempt == 1


async def test_errors_are_retried_up_to_the_limit_then_the_job_fails_with_the_last_reason(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h, "only") as agent:
        run = await submit_run(h, retrying(["error"], limit=2))
        job_id = run.jobs[0].id
        for attempt, wire in enumerate([job_id, f"{job_id}-a2", f"{job_id}-a3"], start=1):
            assignments = await agent.wait_assignments(attempt)
            assert assignments[-1].job_id == wire  # the one agent there is: avoided, but the only fit
            await agent.report(wire, JS.JOB_STATUS_RUNNING)
            await agent.report(wire, JS.JOB_STATUS_FAILED, TR.TERMINATION_REASON_EXIT_CODE)
        job = await h.wait_job(run.name, "main", [JS.JOB_STATUS_FAILED])
        assert job.termination_reason == TR.TERMINATION_REASON_EXIT_CODE
        assert job.attempt == 3 and [a.attempt for a in job.attempts] == [1, 2]
        assert "retry limit 2 reached" in job.message
        assert len(agent.assignments()) == 3  # no fourth attempt


async def test_a_stopped_job_is_not_retried(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h, "only") as agent:
        run = await submit_run(h, retrying(["error", "agent-lost", "preempted"], limit=5))
        (a,) = await agent.wait_assignments(1)
        await agent.report(a.job_id, JS.JOB_STATUS_RUNNING)
        await h.client.StopRun(client_pb2.StopRunRequest(name=run.name), metadata=h.meta)
        await agent.until(lambda: stops(agent), "the stop")
        await agent.report(a.job_id, JS.JOB_STATUS_FAILED, TR.TERMINATION_REASON_EXIT_CODE)  # killed by SIGTERM
        job = await h.wait_job(run.name, "main", [JS.JOB_STATUS_STOPPED])
        assert job.attempt == 1


async def test_preempting_requeues_an_interruptible_job_and_leaves_others_alone(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h, "only") as agent:
        steady = await submit_run(h, job_spec("main", "serve"))
        run = await submit_run(h, interruptible(job_spec("main", "train")))
        await agent.wait_assignments(2)
        wire = {a.spec.commands[0]: a.job_id for a in agent.assignments()}
        for w in wire.values():
            await agent.report(w, JS.JOB_STATUS_RUNNING)
        assert await preempt(h, steady.name) == 0  # not interruptible
        assert await preempt(h, run.name) == 1
        assert await preempt(h, run.name) == 0  # already being preempted
        await agent.until(lambda: stops(agent), "the preemption's stop")
        assert stops(agent) == [(wire["train"], False)]  # with the grace period and the artifacts saved
        await agent.report(wire["train"], JS.JOB_STATUS_UPLOADING)
        await agent.report(wire["train"], JS.JOB_STATUS_STOPPED, TR.TERMINATION_REASON_STOPPED_BY_USER)
        assignments = await agent.wait_assignments(3)
        assert assignments[-1].job_id == f"{wire['train']}-a2"
        job = await h.job(run.name)
        assert job.attempt == 2 and job.attempts[0].termination_reason == TR.TERMINATION_REASON_PREEMPTED
        assert (await h.job(steady.name)).status == JS.JOB_STATUS_RUNNING


async def test_preemption_counts_against_the_limit_when_retry_lists_it(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h, "only") as agent:
        run = await submit_run(h, interruptible(retrying(["preempted"], limit=0)))
        (a,) = await agent.wait_assignments(1)
        await agent.report(a.job_id, JS.JOB_STATUS_RUNNING)
        assert await preempt(h, run.name) == 1
        await agent.until(lambda: stops(agent), "the preemption's stop")
        await agent.report(a.job_id, JS.JOB_STATUS_STOPPED, TR.TERMINATION_REASON_STOPPED_BY_USER)
        job = await h.wait_job(run.name, "main", [JS.JOB_STATUS_FAILED])
        assert job.termination_reason == TR.TERMINATION_REASON_PREEMPTED


async def test_max_duration_stops_the_job_with_that_reason(tmp_path: Path) -> None:
    # A lease longer than the test's time travel: the agent stays online without heartbeats.
    async with coordinator(tmp_path, lease_timeout_s=10_000) as h, sim_agent(h, "only") as agent:
        spec = job_spec("main", "sleep 1d")
        spec.max_duration_s = 90
        run = await submit_run(h, spec)
        (a,) = await agent.wait_assignments(1)
        await h.clock.advance(600)  # waiting on the agent does not count: only running does
        await agent.report(a.job_id, JS.JOB_STATUS_RUNNING)
        await h.clock.advance(89)
        assert stops(agent) == []
        await h.clock.advance(2)
        await agent.until(lambda: stops(agent), "the stop at max_duration")
        assert stops(agent) == [(a.job_id, False)]  # SIGTERM and the grace period, not an abort
        await h.clock.advance(5)
        assert len(stops(agent)) == 1  # asked once
        await agent.report(a.job_id, JS.JOB_STATUS_STOPPED, TR.TERMINATION_REASON_STOPPED_BY_USER)
        job = await h.wait_job(run.name, "main", [JS.JOB_STATUS_FAILED])
        assert job.termination_reason == TR.TERMINATION_REASON_MAX_DURATION
        assert job.message == "max_duration 1m30s exceeded"
        assert (await h.run(run.name)).message == "max_duration 1m30s exceeded"


async def test_only_an_admin_may_preempt(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h, "only") as agent:
        run = await submit_run(h, interruptible(job_spec("main", "train")))
        (a,) = await agent.wait_assignments(1)
        await agent.report(a.job_id, JS.JOB_STATUS_RUNNING)
        engine = h.coordinator.engine
        await engine.db(engine.store.ensure_user, "alice", "alice-token", "member")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await h.client.PreemptRun(
                client_pb2.PreemptRunRequest(name=run.name), metadata=[("authorization", "Bearer alice-token")]
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "PreemptRun needs the admin role; you are a member" in (refused.value.details() or "")
        assert stops(agent) == [] and (await h.job(run.name)).attempt == 1


async def test_a_job_waiting_past_reserve_after_gets_interruptible_jobs_preempted_for_it(tmp_path: Path) -> None:
    async with (
        coordinator(tmp_path, lease_timeout_s=10_000, reserve_after_s=60) as h,
        sim_agent(h, "only", cpu=2) as agent,
    ):
        spot = await submit_run(h, interruptible(job_spec("main", "train", cpu=2)))
        (a,) = await agent.wait_assignments(1)
        await agent.report(a.job_id, JS.JOB_STATUS_RUNNING)
        urgent = await submit_run(h, job_spec("main", "serve", cpu=2))
        await h.clock.advance(59)
        assert stops(agent) == []  # it has not waited long enough
        await h.clock.advance(2)
        await agent.until(lambda: stops(agent), "the preemption of the interruptible job")
        assert stops(agent) == [(a.job_id, False)]
        await h.clock.advance(5)
        assert len(stops(agent)) == 1  # not preempted twice while it stops
        await agent.report(a.job_id, JS.JOB_STATUS_STOPPED, TR.TERMINATION_REASON_STOPPED_BY_USER)
        assignments = await agent.wait_assignments(2)
        assert assignments[1].job_id == urgent.jobs[0].id  # the waiting job gets the room, not the requeued one
        job = await h.job(spot.name)
        assert job.status == JS.JOB_STATUS_PENDING and job.attempt == 2
        assert "preempted for admin's job " in job.attempts[0].message and "(reservation)" in job.attempts[0].message


async def test_nothing_is_preempted_when_that_would_not_let_the_job_fit(tmp_path: Path) -> None:
    async with (
        coordinator(tmp_path, lease_timeout_s=10_000, reserve_after_s=60) as h,
        sim_agent(h, "small", cpu=2) as agent,
    ):
        await submit_run(h, interruptible(job_spec("main", "train", cpu=1)))
        await submit_run(h, job_spec("main", "serve", cpu=1))
        (a, b) = await agent.wait_assignments(2)
        for x in (a, b):
            await agent.report(x.job_id, JS.JOB_STATUS_RUNNING)
        await submit_run(h, job_spec("main", "big", cpu=2))  # needs both CPUs: the steady job holds one
        await h.clock.advance(120)
        assert stops(agent) == []


async def test_a_new_attempt_avoids_the_agent_the_last_one_failed_on_when_another_fits(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h, "snug", cpu=1) as snug, sim_agent(h, "roomy", cpu=4) as roomy:
        run = await submit_run(h, retrying(["error"]))  # one CPU: snug is the best fit
        (a,) = await snug.wait_assignments(1)
        await snug.report(a.job_id, JS.JOB_STATUS_RUNNING)
        await snug.report(a.job_id, JS.JOB_STATUS_FAILED, TR.TERMINATION_REASON_EXIT_CODE)
        (b,) = await roomy.wait_assignments(1)
        assert b.job_id == f"{run.jobs[0].id}-a2"
        assert len(snug.assignments()) == 1


async def test_a_job_preempted_while_its_agent_was_away_before_it_started_is_requeued(tmp_path: Path) -> None:
    async with coordinator(tmp_path, lease_timeout_s=10_000) as h, sim_agent(h, "only") as agent:
        run = await submit_run(h, interruptible(job_spec("main", "train")))
        (a,) = await agent.wait_assignments(1)
        await agent.disconnect()  # the assignment never reached a process
        assert await preempt(h, run.name) == 1
        answer = await agent.connect(active=[])
        assert [x.job_id for x in answer.assignments] == []  # not resent as attempt 1
        (again,) = await agent.wait_assignments(1)
        assert again.job_id == f"{a.job_id}-a2"
        job = await h.job(run.name)
        assert job.attempt == 2 and job.attempts[0].termination_reason == TR.TERMINATION_REASON_PREEMPTED


async def test_a_retried_attempt_s_environment_is_kept_in_the_run_s_record_and_a_stale_one_changes_nothing(
    tmp_path: Path,
) -> None:
    # Attempt 2 and later are sent as `<job id>-aN`: their environment is the job's, stored under its id.
    # Before, it was written under the wire id, which names no job, so the record kept attempt 1's.
    async with coordinator(tmp_path) as h, sim_agent(h, "only") as agent:
        run = await submit_run(h, retrying(["error"]))
        job_id = run.jobs[0].id
        engine = h.coordinator.engine

        async def report_with_environment(wire: str, status: common_pb2.JobStatus.ValueType, python: str) -> None:
            env = common_pb2.JobEnvironment(runtime="null", python_version=python)
            update = agent_pb2.JobUpdate(job_id=wire, status=status, environment=env)
            if status == JS.JOB_STATUS_FAILED:
                update.termination_reason = TR.TERMINATION_REASON_EXIT_CODE
            elif status == JS.JOB_STATUS_DONE:
                update.termination_reason = TR.TERMINATION_REASON_DONE
            await agent.send(agent_pb2.AgentMessage(updates=[update]))
            await agent.until(lambda: (wire, status) in agent.update_acks(), f"ack of {wire} {JS.Name(status)}")

        async def environment() -> dict[str, object]:
            run_id = (await engine.db(engine.store.run_by_name, run.name)).id
            parts = await engine.db(engine.store.records.of_run, run_id)
            assert [key for key in parts if key[1] == "environment"] == [(job_id, "environment")], parts
            return parts[(job_id, "environment")]

        (first,) = await agent.wait_assignments(1)
        assert first.job_id == job_id
        await report_with_environment(job_id, JS.JOB_STATUS_RUNNING, "3.10")
        await report_with_environment(job_id, JS.JOB_STATUS_FAILED, "3.10")
        assert (await environment())["python_version"] == "3.10"
        second = (await agent.wait_assignments(2))[-1]
        assert second.job_id == f"{job_id}-a2"
        await report_with_environment(second.job_id, JS.JOB_STATUS_RUNNING, "3.11")
        assert (await environment())["python_version"] == "3.11"
        # Attempt 1 is over: its late report (a replayed outbox, or a rogue) is acknowledged and applied to nothing.
        await report_with_environment(job_id, JS.JOB_STATUS_FAILED, "2.7")
        assert (await environment())["python_version"] == "3.11"
        await report_with_environment(second.job_id, JS.JOB_STATUS_DONE, "3.12")
        job = await h.wait_job(run.name, "main", [JS.JOB_STATUS_DONE])
        assert job.attempt == 2
        assert (await environment())["python_version"] == "3.12"
