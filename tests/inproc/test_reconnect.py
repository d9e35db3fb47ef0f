"""Hello reconciliation: what the coordinator does with the jobs an agent reports when it reconnects."""

from __future__ import annotations

from pathlib import Path

import pytest

from dstack.protos.v1 import client_pb2
from tests.inproc.factories import JS, TR, coordinator, job_ids, job_spec, sim_agent, submit_run

pytestmark = pytest.mark.inproc


async def test_reconnect_reconciles_reported_jobs_against_the_database(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h, sim_agent(h, "sim") as agent:
        finished = job_ids(await submit_run(h, job_spec("over")))["over"]
        await agent.wait_assignments(1)
        await agent.report(finished, JS.JOB_STATUS_RUNNING)
        await agent.report(finished, JS.JOB_STATUS_DONE, TR.TERMINATION_REASON_DONE)

        run = await submit_run(h, job_spec("kept"), job_spec("forgotten"), job_spec("unstarted"))
        ids = job_ids(run)
        to_stop = await submit_run(h, job_spec("running"), job_spec("never-started"))
        stop_ids = job_ids(to_stop)
        await agent.wait_assignments(6)
        for name in ("kept", "forgotten"):
            await agent.report(ids[name], JS.JOB_STATUS_RUNNING)
        await agent.report(stop_ids["running"], JS.JOB_STATUS_RUNNING)
        await agent.log(ids["kept"], 1, "first", "second")

        # The agent goes away; meanwhile a user stops a run it has jobs of.
        await agent.disconnect()
        await h.client.StopRun(client_pb2.StopRunRequest(name=to_stop.name), metadata=h.meta)

        # It comes back having lost "forgotten", still running "kept" and the stopped run's job, and
        # naming a job that ended long ago and one the coordinator never heard of.
        reply = await agent.connect(active=[ids["kept"], stop_ids["running"], finished, "ghost-job"])

        # Jobs it should not run any more are aborted; the stopped run's live job is stopped (with its grace).
        assert sorted((s.job_id, s.abort) for s in reply.stops) == sorted(
            [(finished, True), ("ghost-job", True), (stop_ids["running"], False)]
        )
        # Assigned but never started: sent again.
        assert [a.job_id for a in reply.assignments] == [ids["unstarted"]]
        # Where each live job's log stands, so the agent resends only what is missing.
        assert {p.job_id: p.seq for p in reply.hello_ack.log_positions} == {ids["kept"]: 2, stop_ids["running"]: 0}

        jobs = {j.job_name: j for j in (await h.run(run.name)).jobs}
        assert jobs["kept"].status == JS.JOB_STATUS_RUNNING
        assert jobs["unstarted"].status == JS.JOB_STATUS_ASSIGNED
        assert jobs["forgotten"].status == JS.JOB_STATUS_FAILED
        assert jobs["forgotten"].termination_reason == TR.TERMINATION_REASON_EXECUTOR_ERROR
        assert jobs["forgotten"].message == "the agent restarted and no longer has this job"
        stopped = {j.job_name: j for j in (await h.run(to_stop.name)).jobs}
        # Stopped while it was away, before it ever started the job: it ends on the coordinator.
        assert stopped["never-started"].status == JS.JOB_STATUS_STOPPED
        assert stopped["never-started"].termination_reason == TR.TERMINATION_REASON_STOPPED_BY_USER
        assert stopped["running"].status == JS.JOB_STATUS_RUNNING  # until the agent reports it stopped

        # The session goes on from there: the kept job's log continues at 3, and it finishes.
        await agent.log(ids["kept"], 3, "third")
        await agent.report(ids["kept"], JS.JOB_STATUS_DONE, TR.TERMINATION_REASON_DONE)
        assert [(s, t) for _, s, t in await h.logs(run.name)] == [(1, "first"), (2, "second"), (3, "third")]
        assert (await h.job(run.name, "kept")).status == JS.JOB_STATUS_DONE
