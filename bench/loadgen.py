"""A load generator for one coordinator: worker processes that each simulate many agents, and
submitter processes that queue single-job runs through the real client API.

Every simulated agent enrols with the join token (`Register`), then opens its own gRPC connection
(its own TCP and TLS session: a local subchannel pool, not one connection shared by all channels of
the process) and keeps its `Connect` stream: hello with its inventory (one in `GPU_EVERY` has eight
fake GPUs), heartbeats at the interval the coordinator asks for, and an answer to every assignment
with no real process: in "hold" mode it reports the job RUNNING and keeps it (the pool fills up and
the queue grows behind it); once released it reports DONE for what it held and RUNNING+DONE at once
for every later assignment.

Processes are spawned, not forked (gRPC's C core does not survive a fork), and each is driven over
a pipe by `Fleet`/`Submitters` in the parent: `bench/scale.py` and tests/integration/test_scale_bench.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc

from dstack.agent.retry import SESSION_BACKOFF
from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, client_pb2, client_pb2_grpc, common_pb2
from dstack.tls import SERVER_NAME

JS = common_pb2.JobStatus
GPU_EVERY = 10  # one simulated agent in ten has eight fake GPUs
GPU_JOB_EVERY = 20  # one submitted job in twenty asks for one GPU
REGISTER_IN_FLIGHT = 32  # per worker: enrolments (and TLS handshakes) at once
# The details grpc.aio gives a write to a call that had already ended (cygrpc `set_internal_error`).
MASKED_BY_WRITE = "Internal error from Core"


@dataclass(frozen=True)
class Target:
    """Where and how to reach the coordinator (picklable: it goes to spawned processes)."""

    address: str
    ca_file: str  # "" for plaintext
    join_token: str = ""
    token: str = ""  # a user's token, for submitters

    def channel(self, own_connection: bool) -> grpc.aio.Channel:
        # A local subchannel pool gives this channel its own TCP connection and TLS session, as a
        # separate agent host would have; the default pool would share one connection per process.
        # An agent's channel has a real agent's options too (keepalive pings, reconnect backoff). Imported
        # here: the agent's modules cost a submitter process half a second it does not need.
        from dstack.agent.connection import CHANNEL_OPTIONS as AGENT_CHANNEL_OPTIONS

        options: list[tuple[str, Any]] = (
            [("grpc.use_local_subchannel_pool", 1), *AGENT_CHANNEL_OPTIONS] if own_connection else []
        )
        if not self.ca_file:
            return grpc.aio.insecure_channel(self.address, options=options)
        creds = grpc.ssl_channel_credentials(root_certificates=Path(self.ca_file).read_bytes())
        return grpc.aio.secure_channel(
            self.address, creds, options=[*options, ("grpc.ssl_target_name_override", SERVER_NAME)]
        )


@dataclass
class AgentStats:
    """One worker's counters (summed over its agents by `Fleet.stats`)."""

    registered: int = 0
    connected: int = 0  # hello answered, stream open
    assigned: int = 0  # assignments received
    done: int = 0  # DONE acknowledged by the coordinator
    held: int = 0  # jobs reported RUNNING and kept (hold mode)
    streams_ended: int = 0  # streams that ended after their hello was answered (a lost agent sees this)
    reconnected: int = 0  # sessions after an agent's first one: each followed a failure counted in errors
    stopped: int = 0  # stops received (an agent's held job failed while it was away)
    errors: int = 0  # failed Register, Connect or stream: each is retried, as a real agent does
    failures: dict[str, int] = field(default_factory=dict)  # errors by cause ("phase: CODE details")
    heartbeats: int = 0
    received: int = 0  # messages read off the coordinator's streams (each one of its writes)
    received_lease_acks: int = 0  # ... of them, a heartbeat's ack alone
    max_heartbeat_gap_s: float = 0.0  # the longest a simulated agent went between two messages
    max_write_s: float = 0.0  # the longest one `call.write` took to return (gRPC accepted the message)
    max_loop_lag_s: float = 0.0  # the worker's own event loop: the most a 0.5 s sleep overslept
    first_done: float = 0.0  # wall clock (time.time), comparable across processes
    last_done: float = 0.0
    last_error: str = ""


COUNTERS = (
    "registered",
    "connected",
    "assigned",
    "done",
    "held",
    "streams_ended",
    "reconnected",
    "stopped",
    "errors",
    "heartbeats",
    "received",
    "received_lease_acks",
)


def inventory(name: str, index: int) -> common_pb2.Inventory:
    inv = common_pb2.Inventory(hostname=name, cpu_count=32, memory_total_bytes=128 << 30, runtime="null", max_jobs=1)
    if index % GPU_EVERY == 0:
        for g in range(8):
            inv.gpus.add(index=g, name="NVIDIA H100 80GB HBM3", memory_total_bytes=80 << 30, simulated=True)
    return inv


class _SessionEnded(Exception):
    """The coordinator ended a simulated agent's stream without an error status (a lost agent sees this)."""


class _Agent:
    """One simulated agent. Like a real one (agent/connection.py) it keeps its session for as long as it
    runs: a failed Register, Connect or stream is counted by its cause (`AgentStats.failures`) and tried
    again after SESSION_BACKOFF, with the jobs it holds listed in the new hello and its unacknowledged
    DONE updates sent again, so that one broken connection costs the bench one reconnect, not the run."""

    def __init__(self, worker: _Worker, name: str, index: int) -> None:
        self.w, self.name, self.inv = worker, name, inventory(name, index)
        self.agent_id = ""
        self.agent_token = ""
        self.held: list[str] = []  # reported RUNNING and kept (hold mode)
        self.unacked: dict[str, agent_pb2.JobUpdate] = {}  # DONE sent, its ack not yet read
        self.out: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        self.sessions = 0

    async def run(self, gate: asyncio.Semaphore) -> None:
        w = self.w
        channel = w.target.channel(own_connection=True)
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        attempts = SESSION_BACKOFF.start()
        try:
            while True:
                phase = "register"
                call: Any = None
                try:
                    async with gate:
                        if not self.agent_token:
                            reg = await stub.Register(
                                agent_pb2.RegisterRequest(name=self.name, inventory=self.inv),
                                metadata=[("authorization", f"Bearer {w.target.join_token}")],
                                timeout=120,
                            )
                            self.agent_id, self.agent_token = reg.agent_id, reg.agent_token
                            w.stats.registered += 1
                        phase = "hello"
                        call = stub.Connect(metadata=[("authorization", f"Bearer {self.agent_token}")])
                        active = sorted({*self.held, *self.unacked})
                        hello = agent_pb2.Hello(agent_id=self.agent_id, inventory=self.inv, active_job_ids=active)
                        await call.write(agent_pb2.AgentMessage(hello=hello))
                        ack = await asyncio.wait_for(call.read(), 120)
                    if ack is grpc.aio.EOF:
                        raise _SessionEnded("stream closed before the hello was answered")
                    assert isinstance(ack, agent_pb2.CoordinatorMessage)
                    phase = "stream"
                    await self._session(call, ack)
                    attempts = SESSION_BACKOFF.start()  # it got going: the next try is a fresh start
                    raise _SessionEnded("stream ended by the coordinator")
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # counted by cause and shown: never hidden, never fatal to the bench
                    if call is not None:
                        call.cancel()  # a hello never answered: its stream goes (the session's own ended already)
                    self._failed(phase, e)
                    if isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.UNAUTHENTICATED:
                        self.agent_token = ""  # as a real agent: register again
                await asyncio.sleep(attempts.next_delay() or SESSION_BACKOFF.max_s)
        finally:
            await channel.close(grace=None)

    async def _session(self, call: Any, ack: agent_pb2.CoordinatorMessage) -> None:
        w = self.w
        w.stats.connected += 1
        if self.sessions:
            w.stats.reconnected += 1
        self.sessions += 1
        for update in self.unacked.values():  # answered by the old stream, perhaps never read
            self.out.put_nowait(agent_pb2.AgentMessage(updates=[update]))
        interval = (ack.hello_ack.heartbeat_interval_ms or 3000) / 1000
        writer = asyncio.create_task(self._write(call, interval))
        try:
            reader = asyncio.create_task(self._read(call, ack))
            done, _ = await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()  # a failed write ends the session as a failed read does
        finally:
            w.stats.connected -= 1
            for t in (writer, reader):
                t.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)
            call.cancel()
        w.stats.streams_ended += 1

    def _failed(self, phase: str, e: Exception) -> None:
        stats = self.w.stats
        stats.errors += 1
        if isinstance(e, grpc.aio.AioRpcError) and e.details() == MASKED_BY_WRITE:
            # Not a status the coordinator sent: the call had ended while this agent wrote (grpc/aio/_call.py
            # `_write`: `set_internal_error`), which hides the real status. Its cause is on the other side:
            # the coordinator's log (bench.scale prints its warnings) and its lost-agent counter.
            cause = f"{phase}: the stream had ended under a write (grpc reports INTERNAL, hiding the status)"
            detail = f"{cause} | {e.debug_error_string()[:600]}"
        elif isinstance(e, grpc.aio.AioRpcError):
            cause = f"{phase}: {e.code().name} {(e.details() or '')[:120]}"
            detail = f"{cause} | {e.debug_error_string()[:600]}"
        else:
            cause = f"{phase}: {type(e).__name__} {str(e)[:120]}"
            detail = cause
        stats.failures[cause] = stats.failures.get(cause, 0) + 1
        stats.last_error = f"{self.name} at {time.strftime('%H:%M:%S')}: {detail}"

    async def _write(self, call: Any, interval: float) -> None:
        """The one writer of the stream: updates as they come, a heartbeat whenever one is due."""
        last = time.monotonic()
        while True:
            wait = max(0.0, last + interval - time.monotonic())
            try:
                msg = await asyncio.wait_for(self.out.get(), wait)
            except TimeoutError:
                msg = agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat())
                self.w.stats.heartbeats += 1
            now = time.monotonic()
            self.w.stats.max_heartbeat_gap_s = max(self.w.stats.max_heartbeat_gap_s, now - last)
            await call.write(msg)
            stats = self.w.stats
            stats.max_write_s = max(stats.max_write_s, time.monotonic() - now)
            last = now

    async def _read(self, call: Any, first: agent_pb2.CoordinatorMessage) -> None:
        msg: Any = first
        while msg is not grpc.aio.EOF:
            self._handle(msg)
            msg = await call.read()

    def _handle(self, msg: agent_pb2.CoordinatorMessage) -> None:
        stats = self.w.stats
        stats.received += 1
        if msg.lease_ack and not (msg.assignments or msg.update_acks or msg.stops or msg.log_acks):
            stats.received_lease_acks += 1
        updates = []
        now = time.time_ns()
        for stop in msg.stops:  # a held job failed while this agent was away: it ends here, as a real one
            if stop.job_id in self.held:
                self.held.remove(stop.job_id)
                stats.held -= 1
            stats.stopped += 1
            reason = (
                common_pb2.TERMINATION_REASON_AGENT_LOST
                if stop.abort
                else common_pb2.TERMINATION_REASON_STOPPED_BY_USER
            )
            status = JS.JOB_STATUS_FAILED if stop.abort else JS.JOB_STATUS_STOPPED
            updates.append(
                agent_pb2.JobUpdate(job_id=stop.job_id, status=status, time_ns=now, termination_reason=reason)
            )
        if msg.assignments:
            for a in msg.assignments:
                if a.job_id in self.held or a.job_id in self.unacked:
                    continue  # sent again after a reconnect: already running here
                stats.assigned += 1
                updates.append(agent_pb2.JobUpdate(job_id=a.job_id, status=JS.JOB_STATUS_RUNNING, time_ns=now))
                if self.w.hold:
                    self.held.append(a.job_id)
                    stats.held += 1
                else:
                    updates.append(self._done(a.job_id, now))
        if updates:
            self.out.put_nowait(agent_pb2.AgentMessage(updates=updates))
        for ack in msg.update_acks:
            if ack.status == JS.JOB_STATUS_DONE and self.unacked.pop(ack.job_id, None) is not None:
                stats.done += 1
                stats.last_done = time.time()
                stats.first_done = stats.first_done or stats.last_done

    def _done(self, job_id: str, now: int) -> agent_pb2.JobUpdate:
        update = agent_pb2.JobUpdate(
            job_id=job_id, status=JS.JOB_STATUS_DONE, time_ns=now, termination_reason=common_pb2.TERMINATION_REASON_DONE
        )
        self.unacked[job_id] = update
        return update

    def release(self) -> None:
        if self.held:
            now = time.time_ns()
            self.out.put_nowait(agent_pb2.AgentMessage(updates=[self._done(j, now) for j in self.held]))
            self.w.stats.held -= len(self.held)
            self.held = []


class _Worker:
    def __init__(self, target: Target, names: Sequence[tuple[str, int]], hold: bool) -> None:
        self.target, self.hold = target, hold
        self.stats = AgentStats()
        self.agents = [_Agent(self, n, i) for n, i in names]

    async def main(self, pipe: Connection) -> None:
        gate = asyncio.Semaphore(REGISTER_IN_FLIGHT)
        tasks = [asyncio.create_task(a.run(gate)) for a in self.agents]
        tasks.append(asyncio.create_task(self._lag()))
        try:
            while True:
                cmd = await asyncio.to_thread(pipe.recv)
                if cmd == "stats":
                    pipe.send(asdict(self.stats))
                elif cmd == "release":
                    self.hold = False
                    for a in self.agents:
                        a.release()
                    pipe.send("ok")
                elif cmd == "reset-gap":
                    self.stats.max_heartbeat_gap_s = self.stats.max_write_s = self.stats.max_loop_lag_s = 0.0
                    pipe.send("ok")
                else:
                    break
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            pipe.send("stopped")

    async def _lag(self) -> None:
        """How late this process's event loop runs (its agents' heartbeats are as late, at least)."""
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(0.5)
            self.stats.max_loop_lag_s = max(self.stats.max_loop_lag_s, time.monotonic() - t0 - 0.5)


def _agent_worker(target: Target, names: list[tuple[str, int]], hold: bool, pipe: Connection) -> None:
    asyncio.run(_Worker(target, names, hold).main(pipe))


class Fleet:
    """`agents` simulated agents spread over `procs` worker processes."""

    def __init__(self, target: Target, agents: int, procs: int, hold: bool = True, prefix: str = "sim") -> None:
        ctx = mp.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        names = [(f"{prefix}-{i:05d}", i) for i in range(agents)]
        for k in range(procs):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_agent_worker, args=(target, names[k::procs], hold, theirs), daemon=True)
            p.start()
            self.pipes.append(mine)
            self.procs.append(p)

    def _all(self, cmd: str) -> list[Any]:
        for pipe in self.pipes:
            pipe.send(cmd)
        return [pipe.recv() for pipe in self.pipes]

    def stats(self) -> AgentStats:
        total = AgentStats()
        for s in self._all("stats"):
            one = AgentStats(**s)
            for k in COUNTERS:
                setattr(total, k, getattr(total, k) + getattr(one, k))
            for cause, n in one.failures.items():
                total.failures[cause] = total.failures.get(cause, 0) + n
            for k in ("max_heartbeat_gap_s", "max_write_s", "max_loop_lag_s"):
                setattr(total, k, max(getattr(total, k), getattr(one, k)))
            if one.first_done:
                total.first_done = min(total.first_done or one.first_done, one.first_done)
            total.last_done = max(total.last_done, one.last_done)
            total.last_error = total.last_error or one.last_error
        return total

    def release(self) -> None:
        self._all("release")

    def reset_gap(self) -> None:
        self._all("reset-gap")

    def pids(self) -> list[int]:
        return [int(p.pid) for p in self.procs]

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send("stop")
        for p in self.procs:
            p.join(15)
            if p.is_alive():
                p.kill()
                p.join(5)


@dataclass
class SubmitStats:
    submitted: int = 0
    errors: int = 0
    started: float = 0.0  # wall clock of the first request
    finished: float = 0.0  # wall clock when the last answer came
    last_error: str = ""


async def _submit(target: Target, runs: int, in_flight: int, batch: int, gpu_offset: int) -> SubmitStats:
    """`runs` single-job runs, `in_flight` requests at once; `batch` > 1: that many runs per
    SubmitRuns call (one RPC, one transaction), else one SubmitRun per run."""
    stats = SubmitStats(started=time.time())
    channel = target.channel(own_connection=False)
    stub = client_pb2_grpc.ClientServiceStub(channel)
    meta = [("authorization", f"Bearer {target.token}")]
    cpu_job = common_pb2.JobSpec(job_name="main", workflow="scale", provider="bash", commands=["true"])
    gpu_job = common_pb2.JobSpec(job_name="main", workflow="scale-gpu", provider="bash", commands=["true"])
    gpu_job.resources.gpu.count = 1
    counter = iter(range(runs))

    def request(i: int) -> client_pb2.SubmitRunRequest:
        gpu = (i + gpu_offset) % GPU_JOB_EVERY == 0
        spec = gpu_job if gpu else cpu_job
        return client_pb2.SubmitRunRequest(workflow=spec.workflow, jobs=[spec])

    async def lane() -> None:
        while True:
            chunk = [i for _, i in zip(range(max(1, batch)), counter, strict=False)]
            if not chunk:
                return
            try:
                if batch > 1:
                    req = client_pb2.SubmitRunsRequest(runs=[request(i) for i in chunk])
                    await stub.SubmitRuns(req, metadata=meta, timeout=300)
                else:
                    await stub.SubmitRun(request(chunk[0]), metadata=meta, timeout=300)
                stats.submitted += len(chunk)
            except grpc.aio.AioRpcError as e:
                stats.errors += len(chunk)
                stats.last_error = f"{e.code().name}: {e.details()}"

    await asyncio.gather(*(lane() for _ in range(in_flight)))
    stats.finished = time.time()
    await channel.close()
    return stats


def _submit_worker(target: Target, runs: int, in_flight: int, batch: int, gpu_offset: int, pipe: Connection) -> None:
    pipe.send(asdict(asyncio.run(_submit(target, runs, in_flight, batch, gpu_offset))))


def submit_runs(target: Target, runs: int, procs: int = 2, in_flight: int = 16, batch: int = 1) -> SubmitStats:
    """Submits `runs` single-job runs from `procs` processes; returns when every answer came."""
    ctx = mp.get_context("spawn")
    pipes, children = [], []
    share = [runs // procs + (1 if k < runs % procs else 0) for k in range(procs)]
    for k in range(procs):
        mine, theirs = ctx.Pipe()
        p = ctx.Process(target=_submit_worker, args=(target, share[k], in_flight, batch, k, theirs), daemon=True)
        p.start()
        pipes.append(mine)
        children.append(p)
    total = SubmitStats()
    for pipe, p in zip(pipes, children, strict=True):
        one = SubmitStats(**pipe.recv())
        p.join(10)
        total.submitted += one.submitted
        total.errors += one.errors
        total.started = min(total.started or one.started, one.started)
        total.finished = max(total.finished, one.finished)
        total.last_error = total.last_error or one.last_error
    return total
