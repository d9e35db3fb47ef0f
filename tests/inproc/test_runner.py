"""agent/runner.py end to end against the in-process coordinator, with the real agent connection code."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest

from dstack.protos.v1 import client_pb2, common_pb2
from tests.inproc.factories import (
    JS,
    TR,
    GatedRuntime,
    coordinator,
    job_ids,
    job_spec,
    real_agent,
    submit_run,
    wait_until,
)

pytestmark = pytest.mark.inproc


async def test_null_runtime_runs_a_run_of_three_jobs_to_done(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h, real_agent(h):
        run = await submit_run(h, job_spec("a"), job_spec("b"), job_spec("c", "true", cpu=0.5))
        assert [j.status for j in run.jobs] == [JS.JOB_STATUS_SUBMITTED] * 3
        for name in ("a", "b", "c"):
            job = await h.wait_job(run.name, name, [JS.JOB_STATUS_DONE])
            assert job.termination_reason == TR.TERMINATION_REASON_DONE
            assert job.agent_name == "agent-1" and job.has_exit_code and job.exit_code == 0
            assert job.started_at_ns and job.finished_at_ns >= job.started_at_ns


async def test_a_job_goes_assigned_running_done_and_its_lines_arrive_while_it_runs(tmp_path: Path) -> None:
    runtime = GatedRuntime(hold_start=True)
    async with coordinator(tmp_path) as h, real_agent(h, runtime=runtime):
        run = await submit_run(h, job_spec("main", "echo one", "echo two"))
        job_id = job_ids(run)["main"]
        # The agent has the job but the runtime has not started it.
        await h.wait_job(run.name, "main", [JS.JOB_STATUS_ASSIGNED])
        runtime.allow_start()
        proc = await runtime.started(job_id)
        await h.wait_job(run.name, "main", [JS.JOB_STATUS_RUNNING])
        await h.wait_logs(run.name, ["echo one", "echo two"])
        proc.say("three")
        await h.wait_logs(run.name, ["echo one", "echo two", "three"])
        proc.exit(0)
        job = await h.wait_job(run.name, "main", [JS.JOB_STATUS_DONE])
        assert job.termination_reason == TR.TERMINATION_REASON_DONE
        assert await h.logs(run.name) == [("main", 1, "echo one"), ("main", 2, "echo two"), ("main", 3, "three")]


async def test_a_dependant_job_starts_only_after_its_dependency_is_done(tmp_path: Path) -> None:
    runtime = GatedRuntime()
    async with coordinator(tmp_path) as h, real_agent(h, runtime=runtime):
        second = job_spec("second")
        second.depends_on.append("first")
        run = await submit_run(h, job_spec("first"), second)
        ids = job_ids(run)
        first = await runtime.started(ids["first"])
        waiting = await h.job(run.name, "second")
        assert waiting.status in (JS.JOB_STATUS_SUBMITTED, JS.JOB_STATUS_PENDING)
        assert ids["second"] not in runtime.procs
        first.exit(0)
        (await runtime.started(ids["second"])).exit(0)
        done = await h.wait_job(run.name, "second", [JS.JOB_STATUS_DONE])
        assert done.started_at_ns >= (await h.job(run.name, "first")).finished_at_ns


async def test_a_non_zero_exit_fails_the_job_and_a_stop_ends_a_running_one(tmp_path: Path) -> None:
    runtime = GatedRuntime()
    async with coordinator(tmp_path) as h, real_agent(h, runtime=runtime):
        failing = await submit_run(h, job_spec("main"))
        (await runtime.started(job_ids(failing)["main"])).exit(3)
        job = await h.wait_job(failing.name, "main", [JS.JOB_STATUS_FAILED])
        assert job.termination_reason == TR.TERMINATION_REASON_EXIT_CODE
        assert (job.exit_code, job.message) == (3, "exited with code 3")

        stopped = await submit_run(h, job_spec("main"))
        await runtime.started(job_ids(stopped)["main"])
        await h.wait_job(stopped.name, "main", [JS.JOB_STATUS_RUNNING])
        await h.client.StopRun(client_pb2.StopRunRequest(name=stopped.name), metadata=h.meta)
        job = await h.wait_job(stopped.name, "main", [JS.JOB_STATUS_STOPPED])
        assert job.termination_reason == TR.TERMINATION_REASON_STOPPED_BY_USER
        assert (await h.run(stopped.name)).status == common_pb2.RUN_STATUS_STOPPED


async def test_a_jobs_secrets_leave_the_agents_memory_when_the_job_ends(tmp_path: Path) -> None:
    runtime = GatedRuntime()
    secret = "sk-live-0123456789abcdef"
    async with coordinator(tmp_path) as h, real_agent(h, runtime=runtime) as agent:
        await h.client.AddSecret(client_pb2.AddSecretRequest(name="API_KEY", value=secret), metadata=h.meta)
        run = await submit_run(h, job_spec("main", "echo $API_KEY"))
        job_id = job_ids(run)["main"]
        proc = await runtime.started(job_id)
        assert proc.job.env["API_KEY"] == secret  # it reached the job, through its environment only
        runner = weakref.ref(agent.jobs[job_id])
        assignment = agent.jobs[job_id].a
        proc.exit(0)
        await h.wait_job(run.name, "main", [JS.JOB_STATUS_DONE])
        del proc

        async def forgotten() -> bool:
            return job_id not in agent.jobs

        await wait_until(forgotten, "the agent to forget the finished job")
        runtime.procs.clear()  # the test's own reference to the job's environment
        gc.collect()
        assert runner() is None, gc.get_referrers(runner())
        assert dict(assignment.secrets) == {}  # even a reference kept elsewhere holds no secret


class PreparingRuntime(GatedRuntime):
    """Records the runtime's preparation (agent/runtimes/base.py: `preparation`, `forget`): where it ran,
    whether the job's folder was there, and what was forgotten. `hold` keeps the preparation waiting."""

    def __init__(self, hold: bool = False) -> None:
        super().__init__()
        self.prepared: dict[str, tuple[bool, bool]] = {}  # job id -> (on a worker thread, folder there)
        self.forgotten: list[str] = []
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.preparing = threading.Event()

    async def preparation(self, job_id: str, workdir: Path, memory_bytes: int, cpu: float) -> Callable[[], None] | None:
        def run() -> None:
            self.preparing.set()
            self.release.wait(30)
            self.prepared[job_id] = (threading.current_thread() is not threading.main_thread(), workdir.is_dir())

        return run

    def forget(self, job_id: str) -> None:
        self.forgotten.append(job_id)


async def test_the_runtimes_preparation_rides_on_the_code_trip_and_is_forgotten_at_the_end(tmp_path: Path) -> None:
    runtime = PreparingRuntime()
    async with coordinator(tmp_path) as h, real_agent(h, runtime=runtime):
        run = await submit_run(h, job_spec("main"))
        job_id = job_ids(run)["main"]
        proc = await runtime.started(job_id)
        assert runtime.prepared == {job_id: (True, True)}  # a worker thread, once the folder is made
        proc.exit(0)
        await h.wait_job(run.name, "main", [JS.JOB_STATUS_DONE])
        await until(lambda: runtime.forgotten == [job_id])


async def test_a_job_stopped_while_prepared_never_starts_and_its_preparation_is_forgotten(tmp_path: Path) -> None:
    # What the runtime made for a job that never starts (its cgroups, on the host runtime) is released.
    runtime = PreparingRuntime(hold=True)
    async with coordinator(tmp_path) as h, real_agent(h, runtime=runtime) as agent:
        run = await submit_run(h, job_spec("main"))
        job_id = job_ids(run)["main"]
        await until(runtime.preparing.is_set)
        await h.client.StopRun(client_pb2.StopRunRequest(name=run.name), metadata=h.meta)
        await until(lambda: any(r.stop_requested for r in agent.jobs.values()))
        runtime.release.set()
        job = await h.wait_job(run.name, "main", [JS.JOB_STATUS_STOPPED])
        assert job.termination_reason == TR.TERMINATION_REASON_STOPPED_BY_USER
        await until(lambda: runtime.forgotten == [job_id])
        assert job_id not in runtime.procs and job_id in runtime.prepared


async def until(check: Callable[[], bool]) -> None:
    """Polls agent-side state (no RPC announces it) until `check` holds."""
    async with asyncio.timeout(30):
        while not check():  # noqa: ASYNC110 - agent-side state announces nothing
            await asyncio.sleep(0.01)
