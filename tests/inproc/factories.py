"""Factories of the in-process tier: a real coordinator in the test's event loop, runs, and agents.

Everything goes through the public gRPC APIs (ClientService for runs, AgentService for agents), as
the CLI and real agents do, so the tests hold whatever the store looks like underneath.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeAlias, TypedDict, TypeVar, Unpack

import grpc

from dstack.agent.config import AgentConfig
from dstack.agent.connection import Agent
from dstack.agent.runtimes import JobProcess, Runtime, RuntimeJob
from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.server import Coordinator, start
from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, client_pb2, client_pb2_grpc, common_pb2
from tests.inproc.clock import ManualClock

ADMIN = "inproc-admin"
JOIN = "inproc-join"
JS = common_pb2.JobStatus
TR = common_pb2.TerminationReason
JobStatus: TypeAlias = common_pb2.JobStatus.ValueType
# How long a condition may take to come true. Generous: a loaded 2-core box is slow, and a passing
# test waits only as long as the condition needs.
WAIT_S = 20.0
POLL_S = 0.01

T = TypeVar("T")


async def wait_until(check: Callable[[], Awaitable[T | None]], what: str) -> T:
    """Polls `check` (state behind an RPC, which no local event announces) until it returns something true."""
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                if value := await check():
                    break
                await asyncio.sleep(POLL_S)  # a poll interval, not a wait for something to happen
    except TimeoutError:
        raise AssertionError(f"timed out after {WAIT_S:g} s waiting for {what}") from None
    return value


# ---- the coordinator -----------------------------------------------------------------------------
@dataclasses.dataclass
class Harness:
    """A coordinator served from this event loop on 127.0.0.1, over a temporary SQLite database."""

    tmp: Path
    clock: ManualClock
    config: CoordinatorConfig
    coordinator: Coordinator
    channel: grpc.aio.Channel
    client: client_pb2_grpc.ClientServiceStub
    stopped: bool = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.coordinator.port}"

    @property
    def meta(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {ADMIN}")]

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        await self.coordinator.stop(grace=0.5)

    async def start_again(self) -> None:
        """Starts a stopped coordinator again on the same port and state (a restart, to its agents)."""
        assert self.stopped
        self.coordinator = await start(dataclasses.replace(self.config, listen=self.address), self.clock)
        self.stopped = False

    # ---- reads, through the client API -------------------------------------------------------
    async def run(self, name: str) -> client_pb2.Run:
        req = client_pb2.GetRunRequest(name=name)
        resp: client_pb2.GetRunResponse = await self.client.GetRun(req, metadata=self.meta)
        return resp.run

    async def job(self, run_name: str, job_name: str = "main") -> client_pb2.Job:
        return next(j for j in (await self.run(run_name)).jobs if j.job_name == job_name)

    async def agent(self, name: str) -> client_pb2.Agent | None:
        req = client_pb2.ListAgentsRequest()
        resp: client_pb2.ListAgentsResponse = await self.client.ListAgents(req, metadata=self.meta)
        return next((a for a in resp.agents if a.name == name), None)

    async def logs(self, run_name: str) -> list[tuple[str, int, str]]:
        """(job, seq, text) of every stored line, in the order StreamLogs gives them."""
        out = []
        async for resp in self.client.StreamLogs(client_pb2.StreamLogsRequest(run_name=run_name), metadata=self.meta):
            out += [(jl.job_name, ln.seq, ln.text) for jl in resp.jobs for ln in jl.lines]
        return out

    async def wait_logs(self, run_name: str, texts: Sequence[str]) -> list[tuple[str, int, str]]:
        """Waits until the run's stored lines read `texts` (in order), and returns them."""

        async def check() -> list[tuple[str, int, str]] | None:
            lines = await self.logs(run_name)
            return lines if [t for _, _, t in lines] == list(texts) else None

        return await wait_until(check, f"the lines of {run_name} to be {list(texts)}")

    async def wait_job(self, run_name: str, job_name: str, statuses: Sequence[JobStatus]) -> client_pb2.Job:
        async def check() -> client_pb2.Job | None:
            job = await self.job(run_name, job_name)
            return job if job.status in statuses else None

        return await wait_until(check, f"job {run_name}/{job_name} in {[JS.Name(s) for s in statuses]}")

    async def wait_agent(self, name: str, status: str) -> client_pb2.Agent:
        async def check() -> client_pb2.Agent | None:
            a = await self.agent(name)
            return a if a is not None and a.status == status else None

        return await wait_until(check, f"agent {name} {status}")


class ConfigOverrides(TypedDict, total=False):
    """The CoordinatorConfig fields a test changes."""

    lease_timeout_s: float
    forget_lost_agents_after_s: float
    heartbeat_interval_s: float
    fairshare: bool
    fairshare_half_life_s: float
    approve_agents: bool
    max_queued_per_user: int
    max_submissions_per_minute: int
    reserve_after_s: float
    preempt_after_s: float
    preempt_min_run_s: float
    preempt_margin: float
    self_fence: str
    fence_margin_s: float
    fence_kill_s: float
    reconnect_grace_s: float
    http_port: int | None


@contextlib.asynccontextmanager
async def coordinator(tmp: Path, **overrides: Unpack[ConfigOverrides]) -> AsyncIterator[Harness]:
    """The real server assembly (coordinator/server.py) on a free port, its leases on a manual clock.

    `overrides` replace CoordinatorConfig fields, e.g. lease_timeout_s=5.
    """
    clock = ManualClock()
    base = CoordinatorConfig(
        state_dir=tmp / "server",
        listen="127.0.0.1:0",
        storage_url=str(tmp / "storage"),
        admin_token=ADMIN,
        join_token=JOIN,
        # Plaintext, said so: this tier drives the server's logic in one process (tests/integration/test_tls.py
        # covers TLS with real processes).
        insecure=True,
        # Simulated agents never fence themselves: a lost agent's jobs are requeued when its lease runs out,
        # as the lease tests expect. Tests of self-fencing's requeue delay set it (test_self_fence.py).
        fence_margin_s=0.0,
    )
    cfg = dataclasses.replace(base, **overrides)
    running = await start(cfg, clock)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    h = Harness(tmp, clock, cfg, running, channel, client_pb2_grpc.ClientServiceStub(channel))
    try:
        yield h
    finally:
        await channel.close()
        await h.stop()


# ---- runs ------------------------------------------------------------------------------------------
def job_spec(name: str = "main", *commands: str, cpu: float = 1.0) -> common_pb2.JobSpec:
    return common_pb2.JobSpec(
        job_name=name,
        workflow="w",
        provider="bash",
        commands=list(commands) or [f"echo {name}"],
        resources=common_pb2.Resources(cpu=cpu),
    )


async def submit_run(h: Harness, *jobs: common_pb2.JobSpec) -> client_pb2.Run:
    """Submits one run (of `jobs`, or of one job named main) through ClientService.SubmitRun."""
    req = client_pb2.SubmitRunRequest(workflow="w", jobs=list(jobs) or [job_spec()])
    resp: client_pb2.SubmitRunResponse = await h.client.SubmitRun(req, metadata=h.meta)
    return resp.run


def job_ids(run: client_pb2.Run) -> dict[str, str]:
    """job name -> job id."""
    return {j.job_name: j.id for j in run.jobs}


# ---- agents at the protocol level ---------------------------------------------------------------
def inventory(name: str, cpu: int = 8, gpus: int = 0) -> common_pb2.Inventory:
    return common_pb2.Inventory(
        hostname=name,
        cpu_count=cpu,
        memory_total_bytes=16 << 30,
        runtime="null",
        max_jobs=64,
        gpus=[
            common_pb2.GpuInfo(index=i, name="H100", memory_total_bytes=80 << 30, simulated=True) for i in range(gpus)
        ],
    )


class SimAgent:
    """An agent the test scripts message by message, through the real AgentService RPCs.

    It sends nothing on its own (no heartbeats): a test that wants the lease renewed says so.
    """

    def __init__(self, h: Harness, name: str, cpu: int = 8, gpus: int = 0) -> None:
        self.h, self.name, self.cpu, self.gpus = h, name, cpu, gpus
        self.agent_id = ""
        self.token = ""
        self.received: list[agent_pb2.CoordinatorMessage] = []
        self.ended = False  # the coordinator ended the stream
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()

    async def register(self) -> SimAgent:
        self._channel = grpc.aio.insecure_channel(self.h.address)
        stub = agent_pb2_grpc.AgentServiceStub(self._channel)
        req = agent_pb2.RegisterRequest(name=self.name, inventory=inventory(self.name, self.cpu, self.gpus))
        resp = await stub.Register(req, metadata=[("authorization", f"Bearer {JOIN}")])
        self.agent_id, self.token = resp.agent_id, resp.agent_token
        return self

    async def connect(self, active: Sequence[str] = ()) -> agent_pb2.CoordinatorMessage:
        """Opens a stream with a hello naming `active` jobs; returns the coordinator's answer to it."""
        await self.disconnect()
        if self._channel is None:
            await self.register()
        else:  # the coordinator may have restarted on the same address: a fresh channel connects at once
            await self._channel.close()
            self._channel = grpc.aio.insecure_channel(self.h.address)
        assert self._channel is not None
        stub = agent_pb2_grpc.AgentServiceStub(self._channel)
        call = stub.Connect(metadata=[("authorization", f"Bearer {self.token}")])
        inv = inventory(self.name, self.cpu, self.gpus)
        hello = agent_pb2.Hello(agent_id=self.agent_id, inventory=inv, active_job_ids=active)
        await call.write(agent_pb2.AgentMessage(hello=hello))
        first = await call.read()
        assert first is not grpc.aio.EOF, "the coordinator closed the stream instead of answering the hello"
        self._call, self.ended, self.received = call, False, []
        self._reader = asyncio.create_task(self._read(call))
        answer: agent_pb2.CoordinatorMessage = first
        return answer

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            while (msg := await call.read()) is not grpc.aio.EOF:
                async with self._changed:
                    self.received.append(msg)
                    self._changed.notify_all()
        except grpc.aio.AioRpcError:
            pass  # the coordinator went away: the same as the end of the stream, to the agent
        async with self._changed:
            self.ended = True
            self._changed.notify_all()

    async def disconnect(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        self._call = self._reader = None

    async def close(self) -> None:
        await self.disconnect()
        if self._channel is not None:
            await self._channel.close()

    async def until(self, predicate: Callable[[], object], what: str) -> None:
        """Waits until `predicate` holds over what has been received (or the stream's end)."""
        try:
            async with asyncio.timeout(WAIT_S), self._changed:
                await self._changed.wait_for(predicate)
        except TimeoutError:
            raise AssertionError(f"{self.name}: timed out waiting for {what}") from None

    # ---- what the coordinator sent -------------------------------------------------------------
    def assignments(self) -> list[agent_pb2.JobAssignment]:
        return [a for m in self.received for a in m.assignments]

    def update_acks(self) -> set[tuple[str, int]]:
        return {(a.job_id, a.status) for m in self.received for a in m.update_acks}

    def log_acks(self) -> dict[str, int]:
        acks: dict[str, int] = {}
        for m in self.received:
            for a in m.log_acks:
                acks[a.job_id] = max(acks.get(a.job_id, 0), a.seq)
        return acks

    async def wait_assignments(self, n: int) -> list[agent_pb2.JobAssignment]:
        await self.until(lambda: len(self.assignments()) >= n, f"{n} assignments to {self.name}")
        return self.assignments()

    # ---- what the agent says -------------------------------------------------------------------
    async def send(self, msg: agent_pb2.AgentMessage) -> None:
        assert self._call is not None, "not connected"
        await self._call.write(msg)

    async def report(
        self,
        job_id: str,
        status: common_pb2.JobStatus.ValueType,
        reason: common_pb2.TerminationReason.ValueType = TR.TERMINATION_REASON_UNSPECIFIED,
    ) -> None:
        """Sends a job update and waits for the coordinator to acknowledge it (it is stored then)."""
        await self.send(
            agent_pb2.AgentMessage(
                updates=[agent_pb2.JobUpdate(job_id=job_id, status=status, termination_reason=reason)]
            )
        )
        await self.until(lambda: (job_id, status) in self.update_acks(), f"ack of {job_id} {JS.Name(status)}")

    async def log(self, job_id: str, first_seq: int, *texts: str) -> None:
        """Sends lines first_seq, first_seq + 1, ... and waits until they are acknowledged."""
        lines = [
            common_pb2.LogLine(seq=first_seq + i, stream=common_pb2.LOG_STREAM_STDOUT, text=t)
            for i, t in enumerate(texts)
        ]
        await self.send(agent_pb2.AgentMessage(logs=[agent_pb2.LogBatch(job_id=job_id, lines=lines)]))
        last = first_seq + len(texts) - 1
        await self.until(lambda: self.log_acks().get(job_id, 0) >= last, f"ack of {job_id} line {last}")

    async def heartbeat(self) -> None:
        await self.send(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat()))


@contextlib.asynccontextmanager
async def sim_agent(h: Harness, name: str = "sim-1", cpu: int = 8, gpus: int = 0) -> AsyncIterator[SimAgent]:
    """A registered and connected SimAgent (with `gpus` simulated GPUs), online once this yields."""
    agent = SimAgent(h, name, cpu, gpus)
    try:
        await agent.connect()
        yield agent
    finally:
        await agent.close()


# ---- the real agent --------------------------------------------------------------------------------
class GatedProcess(JobProcess):
    """A job process the test drives: it prints what it is told and exits when told."""

    def __init__(self, job: RuntimeJob) -> None:
        self.job = job
        self._output: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        for command in job.commands:  # its output starts with its commands, as `bash -x` would say them
            self.say(command)

    def say(self, *lines: str) -> None:
        for line in lines:
            self._output.put_nowait(line.encode() + b"\n")

    def write(self, data: bytes) -> None:
        """Output as one chunk (one read of the job's pipe: many lines, or part of one)."""
        self._output.put_nowait(data)

    def exit(self, code: int = 0) -> None:
        if not self._exit.done():
            self._output.put_nowait(None)
            self._exit.set_result(code)

    async def output(self) -> AsyncIterator[tuple[int, bytes]]:
        while (chunk := await self._output.get()) is not None:
            yield common_pb2.LOG_STREAM_STDOUT, chunk

    async def wait(self) -> int:
        return await self._exit

    async def stop(self, abort: bool) -> None:
        self.exit(-15)


class GatedRuntime(Runtime):
    """Jobs start only once the test allows it (so ASSIGNED can be seen) and run until it ends them."""

    name = "gated"

    def __init__(self, hold_start: bool = False) -> None:
        self.procs: dict[str, GatedProcess] = {}
        self._may_start = asyncio.Event()
        if not hold_start:
            self._may_start.set()
        self._started = asyncio.Condition()

    def allow_start(self) -> None:
        self._may_start.set()

    async def start(self, job: RuntimeJob) -> JobProcess:
        await self._may_start.wait()
        proc = GatedProcess(job)
        async with self._started:
            self.procs[job.job_id] = proc
            self._started.notify_all()
        return proc

    async def started(self, job_id: str) -> GatedProcess:
        try:
            async with asyncio.timeout(WAIT_S), self._started:
                await self._started.wait_for(lambda: job_id in self.procs)
        except TimeoutError:
            raise AssertionError(f"job {job_id} did not start") from None
        return self.procs[job_id]


@contextlib.asynccontextmanager
async def real_agent(
    h: Harness, name: str = "agent-1", runtime: Runtime | None = None, simulate_gpus: str = "", via: str = ""
) -> AsyncIterator[Agent]:
    """The agent of agent/connection.py in this event loop: the null runtime unless `runtime` is given
    (`simulate_gpus`: as `dstack agent --simulate-gpus`, e.g. "1xA100-80GB"; `via`: the address it dials
    instead of the coordinator's, e.g. a proxy that cuts it off)."""
    config = AgentConfig(
        coordinator=via or h.address,
        home=h.tmp / name,
        join_token=JOIN,
        name=name,
        runtime="null",
        stop_grace_s=1.0,
        insecure=True,  # the in-process coordinator is plaintext (see `coordinator`)
        simulate_gpus=simulate_gpus,
    )
    agent = Agent(config)
    if runtime is not None:
        agent.runtime = agent.deps.runtime = runtime
    task = asyncio.create_task(agent.run(), name=f"agent {name}")
    try:
        await h.wait_agent(name, "online")
        yield agent
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await agent.close()
