"""Self-fencing (docs/lifecycle.md, "Self-fencing"): an agent with no lease renewal acknowledged for a
lease stops its jobs itself, and the coordinator requeues a lost agent's jobs only a fence margin later,
so no attempt runs on two agents at once. A stopped coordinator (its port refuses) requeues nothing, so
then the jobs keep running.

The coordinator's side runs on its manual clock (nothing sleeps); the agent's side is the real agent
(agent/connection.py, agent/lease.py) on the real monotonic clock with a lease of about a second, dialling
the coordinator through `Link`, a TCP relay the test cuts (packets dropped) or closes (the port refuses).

Attacks run here:
- the agent's link is cut while its job runs: the agent kills the job within the margin of its lease,
  and reports it `agent lost` once the link is back (the coordinator, which never lost it, fails it so);
- the coordinator's port refuses for longer than a lease (a restart): the job keeps running and finishes
  `done` in its first attempt; under `--self-fence strict` the same refusal stops it;
- a silent agent's jobs are requeued no earlier than lease + margin after its last message;
- a heartbeat is acknowledged by its seq only; the hello ack carries the pool's policy;
- a job the agent fenced itself is requeued as a new attempt where its `retry` lists agent-lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dstack.protos.v1 import agent_pb2, client_pb2, common_pb2
from tests.cluster.invariants import self_fenced_jobs
from tests.inproc.factories import (
    JS,
    TR,
    GatedProcess,
    GatedRuntime,
    Harness,
    coordinator,
    job_spec,
    real_agent,
    sim_agent,
    submit_run,
    wait_until,
)

pytestmark = pytest.mark.inproc

LEASE_S = 1.5  # the agents' lease: they count on the real clock
MARGIN_S = 5.0  # the coordinator requeues this long after the lease
KILL_S = 4.0  # the agent stops its jobs this long before that: 2.5 s after its last acknowledged send
BEAT_S = 0.25


class Link:
    """A TCP relay between an agent and the coordinator: `cut` drops everything both ways (open
    connections hang and new ones are accepted into silence, as in a partition), `refuse` closes the
    port (connections refused, as when the coordinator is not running), `restore` relays again (the
    connections of before are closed: their streams lost bytes)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.dropping = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        for r, w in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(r, w))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(1 << 16):
                if not self.dropping:
                    writer.write(data)
                    await writer.drain()
        writer.close()

    def _drop_connections(self) -> None:
        for w in self._writers:
            w.close()
        self._writers.clear()

    def cut(self) -> None:
        self.dropping = True

    async def refuse(self) -> None:
        assert self._server is not None
        self._server.close()
        self._drop_connections()
        await self._server.wait_closed()
        self._server = None

    async def restore(self) -> None:
        self.dropping = False
        self._drop_connections()
        if self._server is None:
            await self.listen()

    async def close(self) -> None:
        if self._server is not None:
            await self.refuse()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def link_to(h: Harness) -> AsyncIterator[Link]:
    link = Link(h.coordinator.port)
    await link.listen()
    try:
        yield link
    finally:
        await link.close()


async def finished(h: Harness, run_name: str) -> common_pb2.JobStatus.ValueType | None:
    job = await h.job(run_name)
    return job.status if job.status in (JS.JOB_STATUS_DONE, JS.JOB_STATUS_FAILED) else None


async def running(h: Harness, run_name: str) -> common_pb2.JobStatus.ValueType | None:
    job = await h.job(run_name)
    return job.status if job.status == JS.JOB_STATUS_RUNNING else None


@contextlib.asynccontextmanager
async def a_job_behind_a_link(
    tmp_path: Path, **options: object
) -> AsyncIterator[tuple[Harness, Link, client_pb2.Run, GatedProcess]]:
    """A coordinator with this file's short leases (unless `options` say otherwise), a real agent reaching it
    through a link the test cuts, refuses or restores, and one job running on that agent."""
    settings: dict[str, object] = {
        "lease_timeout_s": LEASE_S,
        "heartbeat_interval_s": BEAT_S,
        "fence_margin_s": MARGIN_S,
        "fence_kill_s": KILL_S,
        **options,
    }
    runtime = GatedRuntime()
    async with (
        coordinator(tmp_path, **settings) as h,  # type: ignore[arg-type]
        link_to(h) as link,
        real_agent(h, runtime=runtime, via=link.address),
    ):
        run = await submit_run(h, job_spec("main"))
        proc = await runtime.started(run.jobs[0].id)
        await wait_until(lambda: running(h, run.name), "the job to run")
        yield h, link, run, proc


async def test_an_agent_cut_off_kills_its_job_within_the_margin_of_its_lease_and_reports_it_lost_when_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "dstack.agent")
    async with a_job_behind_a_link(tmp_path) as (h, link, run, proc):
        cut_at = time.monotonic()
        link.cut()
        code = await asyncio.wait_for(proc.wait(), LEASE_S + MARGIN_S + 30)
        killed_after = time.monotonic() - cut_at
        # The coordinator may requeue lease + margin after the last heartbeat it got, which came before
        # the cut: the job must be dead by then (here the coordinator's clock stands still, so nothing is
        # requeued and the bound is checked on the agent's side).
        assert killed_after < LEASE_S + MARGIN_S, f"the agent killed its job {killed_after:.2f}s after the cut"
        assert code == -15
        # The chaos bench counts healthy jobs stopped this way from the agents' logs: its parser reads this line.
        assert self_fenced_jobs(caplog.text) == 1, caplog.text

        await link.restore()  # the agent reconnects; the coordinator never lost it: it takes the agent's report

        async def failed() -> common_pb2.TerminationReason.ValueType | None:
            job = await h.job(run.name)
            return job.termination_reason if job.status == JS.JOB_STATUS_FAILED else None

        assert await wait_until(failed, "the job to be reported lost") == TR.TERMINATION_REASON_AGENT_LOST
        job = await h.job(run.name)
        assert "stopped the job itself" in job.message, job.message


async def test_a_coordinator_whose_port_refuses_for_longer_than_a_lease_stops_no_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A restart of the coordinator (kill -9, upgrade): nobody requeues while it is down, and it extends
    every lease when it starts, so the agent keeps its job; the run finishes in its first attempt."""
    caplog.set_level(logging.INFO, "dstack.agent")
    async with a_job_behind_a_link(tmp_path) as (h, link, run, proc):
        await link.refuse()
        await asyncio.sleep(3 * LEASE_S)  # the outage: three leases with no renewal
        assert "the coordinator is down" in caplog.text
        await link.restore()
        proc.exit(0)

        assert await wait_until(lambda: finished(h, run.name), "the job to finish") == JS.JOB_STATUS_DONE
        assert (await h.job(run.name)).attempt == 1


async def test_under_strict_fencing_a_refusing_port_is_no_excuse(tmp_path: Path) -> None:
    """For networks where a firewall rejects (not drops) the coordinator's port: a refusal there is no
    proof that the coordinator is down."""
    async with a_job_behind_a_link(tmp_path, self_fence="strict") as (_, link, _run, proc):
        await link.refuse()
        assert await asyncio.wait_for(proc.wait(), LEASE_S + MARGIN_S + 30) == -15


async def test_the_hello_ack_carries_the_policy_and_a_heartbeat_is_acknowledged_by_its_seq(tmp_path: Path) -> None:
    async with coordinator(tmp_path / "on", lease_timeout_s=5.0, self_fence="strict") as h, sim_agent(h) as agent:
        ack = (await agent.connect()).hello_ack
        assert (ack.self_fence_after_ms, ack.self_fence_strict) == (5000, True)
        await agent.send(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=7)))
        await agent.until(lambda: any(m.lease_ack == 7 for m in agent.received), "the ack of heartbeat 7")
    async with coordinator(tmp_path / "off", self_fence="off") as h, sim_agent(h) as agent:
        ack = (await agent.connect()).hello_ack
        assert (ack.self_fence_after_ms, ack.self_fence_strict) == (0, False)


async def test_a_silent_agents_job_is_requeued_only_a_fence_margin_after_its_lease(tmp_path: Path) -> None:
    lease, margin = 5.0, 3.0
    async with (
        coordinator(tmp_path, lease_timeout_s=lease, fence_margin_s=margin) as h,
        sim_agent(h, "silent", cpu=1) as silent,
    ):
        run = await submit_run(h, job_spec("main"))
        (a,) = await silent.wait_assignments(1)
        await silent.report(a.job_id, JS.JOB_STATUS_RUNNING)
        # Past the agent's own deadline (it has killed the job by now), short of its margin: still its job.
        await h.clock.advance(lease + margin - 0.5)
        assert (await h.agent("silent")).status == "online"  # type: ignore[union-attr]
        assert (await h.job(run.name)).status == JS.JOB_STATUS_RUNNING
        await h.clock.advance(1.0)
        assert (await h.agent("silent")).status == "lost"  # type: ignore[union-attr]
        job = await h.job(run.name)
        assert (job.status, job.termination_reason) == (JS.JOB_STATUS_FAILED, TR.TERMINATION_REASON_AGENT_LOST)


async def test_a_job_its_agent_fenced_is_requeued_where_its_retry_lists_agent_lost(tmp_path: Path) -> None:
    """The agent stopped the job (it heard no ack) while the coordinator still had the agent online: its
    report requeues the job like a loss would."""
    spec = job_spec("main")
    spec.retry.limit, spec.retry.on[:] = 1, ["agent-lost"]
    async with coordinator(tmp_path) as h, sim_agent(h, "a", cpu=1) as agent:
        run = await submit_run(h, spec)
        (first,) = await agent.wait_assignments(1)
        await agent.report(first.job_id, JS.JOB_STATUS_RUNNING)
        await agent.report(first.job_id, JS.JOB_STATUS_FAILED, TR.TERMINATION_REASON_AGENT_LOST)
        (_, second) = await agent.wait_assignments(2)
        assert second.job_id == f"{first.job_id}-a2"
        job = await h.job(run.name)
        assert job.attempt == 2 and job.attempts[0].termination_reason == TR.TERMINATION_REASON_AGENT_LOST


async def test_a_coordinator_back_before_the_agent_reconnects_is_counted_down_until_it_came_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A restart seen in CI's chaos run: the port refused (the coordinator down) and then accepted again
    while the agent waited out its reconnect backoff. Refusals were only probed near the deadline, by
    then the port was open, and the agent stopped a healthy job. Each failed reconnect now probes too:
    the lease counts from the last refusal. (The relay's silence stands for the agent not being back in
    session yet; the in-process coordinator, which never went down, requeues only after L + M.)"""
    caplog.set_level(logging.INFO, "dstack.agent")
    margin, kill = 10.0, 4.0  # the agent stops its jobs 7.5 s after its last renewal; the probes start at 5.5 s
    runtime = GatedRuntime()
    async with (
        coordinator(
            tmp_path, lease_timeout_s=LEASE_S, heartbeat_interval_s=BEAT_S, fence_margin_s=margin, fence_kill_s=kill
        ) as h,
        link_to(h) as link,
        real_agent(h, runtime=runtime, via=link.address),
    ):
        run = await submit_run(h, job_spec("main"))
        proc = await runtime.started(run.jobs[0].id)
        await wait_until(lambda: running(h, run.name), "the job to run")

        await link.refuse()  # down: refused until 4.5 s, before the old code's probes began
        await asyncio.sleep(4.5)
        await link.restore()
        link.cut()  # up again, the agent not yet back in session: past the old code's deadline (7.5 s)
        await asyncio.sleep(4.0)
        assert "self-fence" not in caplog.text
        await link.restore()
        proc.exit(0)

        assert await wait_until(lambda: finished(h, run.name), "the job to finish") == JS.JOB_STATUS_DONE
        assert (await h.job(run.name)).attempt == 1


async def test_a_coordinator_back_and_listening_that_answers_the_hello_late_stops_no_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Seen in the mixed chaos scenario under load: the coordinator restarted, listened again, and answered
    the agents' hellos 11 s later, past their 8 s deadline; two agents stopped healthy jobs. A refusal now
    counts for self_fence_after + the reconnect grace the hello ack published (every later start gives that
    much: coordinator/restart_lease.py), so a late hello within it stops nothing. Here the port refuses
    (down), then accepts into silence (back, not answering) for longer than the agent's deadline."""
    caplog.set_level(logging.INFO, "dstack.agent")
    grace = 20.0  # the agent's deadline: 2.5 s after a renewal, 22.5 s after a refusal
    async with a_job_behind_a_link(tmp_path, reconnect_grace_s=grace) as (h, link, run, proc):

        async def refused() -> bool:
            return "the coordinator is down" in caplog.text

        await link.refuse()  # down until the agent has been refused
        await wait_until(refused, "a refused reconnect")
        await link.restore()
        link.cut()  # back and listening, not answering: 1 s past the 2.5 s the agent counted from a refusal before
        await asyncio.sleep(LEASE_S + MARGIN_S - KILL_S + 1.0)
        assert "self-fence" not in caplog.text
        await link.restore()
        proc.exit(0)

        assert await wait_until(lambda: finished(h, run.name), "the job to finish") == JS.JOB_STATUS_DONE
        assert (await h.job(run.name)).attempt == 1
