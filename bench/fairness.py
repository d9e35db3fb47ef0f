"""Fair share, reservations and queue estimates on a fixed trace, with fair share on and then off.

The trace (issue 12): user A floods 500 one-GPU jobs at t=0, user B submits 20 one-GPU jobs a minute
later, user C one 8-GPU job at the same time as B. Jobs take known times (A's and B's: 45-75 s, drawn
from a fixed seed; C's: 120 s) on HOSTS simulated agents of 8 GPUs each.

What runs: the real coordinator (coordinator/server.py: engine, planner, store, gRPC services) in this
process, on a manual clock (tests/inproc/clock.py) that jumps from event to event, so half an hour
of cluster time takes seconds. The agents are simulated gRPC clients of the real AgentService: each
assignment is answered with RUNNING at once and DONE when its duration has passed on that clock.
Runs are submitted through the real ClientService with each user's own token.

Reported, per mode: each user's share of GPU time per window, Jain's fairness index between A and B
while both have jobs waiting (from one job duration after B's submission), B's first wait (target:
at most one job duration), C's wait (target: at most --reserve-after plus one job duration).

Usage: python -m bench.fairness [HOSTS] [HALF_LIFE_S]
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.server import Coordinator, start
from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, client_pb2, client_pb2_grpc, common_pb2
from tests.inproc.clock import ManualClock

JS = common_pb2.JobStatus
NS = 1_000_000_000
ADMIN, JOIN = "bench-admin", "bench-join"
USERS = {"A": "token-a", "B": "token-b", "C": "token-c"}
JOB_S = (45, 75)  # A's and B's job durations, uniform in this range
ONE_JOB = JOB_S[1]  # "one job duration" for the targets: the longest
BIG_JOB_S = 120
B_AT = C_AT = 60.0
RESERVE_AFTER = 300.0
WINDOW = 60.0


@dataclass(frozen=True)
class TraceJob:
    user: str
    at: float  # submission, seconds from the start
    gpus: int
    seconds: int


def trace() -> list[TraceJob]:
    rng = random.Random(12)
    jobs = [TraceJob("A", 0.0, 1, rng.randint(*JOB_S)) for _ in range(500)]
    jobs += [TraceJob("B", B_AT, 1, rng.randint(*JOB_S)) for _ in range(20)]
    jobs.append(TraceJob("C", C_AT, 8, BIG_JOB_S))
    return jobs


@dataclass
class Started:
    user: str
    gpus: int
    submitted: float
    start: float
    end: float


@dataclass
class SimHost:
    """An agent with 8 simulated GPUs that runs each job for the seconds its command says."""

    name: str
    address: str
    clock: ManualClock
    ends: dict[str, float] = field(default_factory=dict)  # job id -> end (seconds since t0)
    received: int = 0
    unacked: set[tuple[str, int]] = field(default_factory=set)
    call: grpc.aio.StreamStreamCall | None = None
    reader: asyncio.Task[None] | None = None
    writing: asyncio.Lock = field(default_factory=asyncio.Lock)  # one write at a time on a gRPC stream
    t0: int = 0

    def now(self) -> float:
        return (self.clock.time_ns() - self.t0) / NS

    async def connect(self) -> None:
        channel = grpc.aio.insecure_channel(self.address)
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        gpus = [common_pb2.GpuInfo(index=i, name="H100", memory_total_bytes=80 << 30, simulated=True) for i in range(8)]
        inv = common_pb2.Inventory(
            hostname=self.name, cpu_count=64, memory_total_bytes=512 << 30, runtime="null", max_jobs=100, gpus=gpus
        )
        reg = await stub.Register(
            agent_pb2.RegisterRequest(name=self.name, inventory=inv), metadata=[("authorization", f"Bearer {JOIN}")]
        )
        self.call = stub.Connect(metadata=[("authorization", f"Bearer {reg.agent_token}")])
        await self.call.write(agent_pb2.AgentMessage(hello=agent_pb2.Hello(agent_id=reg.agent_id, inventory=inv)))
        await self.call.read()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.call is not None
        while (msg := await self.call.read()) is not grpc.aio.EOF:
            for a in msg.assignments:
                self.received += 1
                self.ends[a.job_id] = self.now() + int(a.spec.commands[0].split()[1])
                await self._update(a.job_id, JS.JOB_STATUS_RUNNING)
            for ack in msg.update_acks:
                self.unacked.discard((ack.job_id, ack.status))

    async def _update(self, job_id: str, status: int) -> None:
        assert self.call is not None
        self.unacked.add((job_id, status))
        update = agent_pb2.JobUpdate(job_id=job_id, status=status, time_ns=self.clock.time_ns())  # type: ignore[arg-type]
        if status == JS.JOB_STATUS_DONE:
            update.termination_reason = common_pb2.TERMINATION_REASON_DONE
        async with self.writing:
            await self.call.write(agent_pb2.AgentMessage(updates=[update]))

    async def finish_due(self) -> None:
        for job_id, end in list(self.ends.items()):
            if end <= self.now() + 1e-9:
                del self.ends[job_id]
                await self._update(job_id, JS.JOB_STATUS_DONE)


async def replay(fairshare: bool, hosts: int, half_life: float) -> list[Started]:
    """The trace through a fresh coordinator: fair share and reservations on, or both off (the
    scheduler as it was before them: first come, first served, with backfill)."""
    tmp = Path(tempfile.mkdtemp(prefix="dstack-fairness-"))
    clock = ManualClock()
    config = CoordinatorConfig(
        state_dir=tmp / "server",
        listen="127.0.0.1:0",
        storage_url=str(tmp / "storage"),
        admin_token=ADMIN,
        join_token=JOIN,
        lease_timeout_s=1e6,  # the simulated agents send no heartbeats; jumps of the clock must not lose them
        insecure=True,  # plaintext on loopback in this process, as the in-process tests
        fairshare=fairshare,
        fairshare_half_life_s=half_life,
        reserve_after_s=RESERVE_AFTER if fairshare else math.inf,
    )
    coordinator: Coordinator = await start(replace(config), clock)
    engine = coordinator.engine
    for user, token in USERS.items():
        await engine.db(engine.store.ensure_user, user, token, "member")
    address = f"127.0.0.1:{coordinator.port}"
    channel = grpc.aio.insecure_channel(address)
    client = client_pb2_grpc.ClientServiceStub(channel)
    t0 = clock.time_ns()
    sims = [SimHost(f"host-{i + 1}", address, clock, t0=t0) for i in range(hosts)]
    for s in sims:
        await s.connect()

    async def settle() -> None:
        while True:
            await engine.settled()
            await asyncio.sleep(0.002)
            delivered = sum(s.received for s in sims) == engine.assignments_sent
            if delivered and not any(s.unacked for s in sims) and engine._idle.is_set():
                await engine.settled()
                if sum(s.received for s in sims) == engine.assignments_sent:
                    return

    pending = sorted(trace(), key=lambda j: j.at)
    submitted: dict[str, TraceJob] = {}
    starts: dict[str, float] = {}
    now = 0.0
    while pending or any(s.ends for s in sims):
        due = [j for j in pending if j.at <= now]
        pending = pending[len(due) :]
        for j in due:
            spec = common_pb2.JobSpec(
                job_name="main",
                workflow="big" if j.gpus > 1 else "train",
                provider="bash",
                commands=[f"sleep {j.seconds}"],
                resources=common_pb2.Resources(gpu=common_pb2.GpuRequest(count=j.gpus)),
            )
            req = client_pb2.SubmitRunRequest(workflow=spec.workflow, jobs=[spec])
            resp = await client.SubmitRun(req, metadata=[("authorization", f"Bearer {USERS[j.user]}")])
            submitted[resp.run.jobs[0].id] = j
        for s in sims:
            await s.finish_due()
        await settle()
        for s in sims:
            for job_id, end in s.ends.items():
                starts.setdefault(job_id, end - submitted[job_id].seconds)
        nexts = [j.at for j in pending[:1]] + [e for s in sims for e in s.ends.values()]
        if not nexts:
            break
        step = max(min(nexts) - now, 0.0)
        await clock.advance(step)
        now = (clock.time_ns() - t0) / NS
    await channel.close()
    for s in sims:
        if s.call is not None:
            s.call.cancel()
    await coordinator.stop(grace=0.1)
    return [
        Started(j.user, j.gpus, j.at, starts[job_id], starts[job_id] + j.seconds) for job_id, j in submitted.items()
    ]


# ---- figures -------------------------------------------------------------------------------------
def gpu_seconds(jobs: list[Started], user: str, lo: float, hi: float) -> float:
    return sum(j.gpus * max(0.0, min(j.end, hi) - max(j.start, lo)) for j in jobs if j.user == user)


def jain(xs: list[float]) -> float:
    total, squares = sum(xs), sum(x * x for x in xs)
    return 1.0 if squares == 0 else total * total / (len(xs) * squares)


@dataclass
class Figures:
    b_first_wait: float
    c_wait: float
    jain_ab: float | None
    jain_ab_from_submit: float | None
    both_wait: tuple[float, float]
    windows: list[tuple[float, dict[str, float]]]
    makespan: float


def figures(jobs: list[Started], hosts: int) -> Figures:
    b = [j for j in jobs if j.user == "B"]
    c = next(j for j in jobs if j.user == "C")
    b_last_start = max(j.start for j in b)
    lo, hi = B_AT + ONE_JOB, b_last_start  # both have jobs waiting, after one job duration
    jain_ab = None
    if hi > lo:
        jain_ab = jain([gpu_seconds(jobs, "A", lo, hi), gpu_seconds(jobs, "B", lo, hi)])
    from_submit = None
    if hi > B_AT:
        from_submit = jain([gpu_seconds(jobs, "A", B_AT, hi), gpu_seconds(jobs, "B", B_AT, hi)])
    end = max(j.end for j in jobs)
    windows = []
    t = 0.0
    while t < min(end, 900.0):
        capacity = hosts * 8 * WINDOW
        windows.append((t, {u: gpu_seconds(jobs, u, t, t + WINDOW) / capacity for u in "ABC"}))
        t += WINDOW
    return Figures(
        b_first_wait=min(j.start for j in b) - B_AT,
        c_wait=c.start - C_AT,
        jain_ab=jain_ab,
        jain_ab_from_submit=from_submit,
        both_wait=(lo, hi),
        windows=windows,
        makespan=end,
    )


def report(title: str, f: Figures, wall: float) -> None:
    print(f"\n== {title} (replayed in {wall:.1f} s of wall time; all of it done at t={f.makespan:.0f} s)")
    print("share of the cluster's GPU time per minute (A / B / C):")
    for t, shares in f.windows:
        print(f"  t={t:4.0f}-{t + WINDOW:4.0f} s   " + "  ".join(f"{u} {shares[u]:5.0%}" for u in "ABC"))
    lo, hi = f.both_wait
    if f.jain_ab is None:
        print(
            f"Jain's index A/B while both wait, from t={lo:.0f} s: no such window (B's jobs all started by t={hi:.0f})"
        )
    else:
        print(f"Jain's index A/B while both wait (t={lo:.0f}-{hi:.0f} s): {f.jain_ab:.3f}   (target >= 0.95)")
    if f.jain_ab_from_submit is not None:
        print(
            f"Jain's index A/B from B's submission to B's last start (t={B_AT:.0f}-{hi:.0f} s):"
            f" {f.jain_ab_from_submit:.3f}"
        )
    print(f"B's first wait: {f.b_first_wait:.0f} s   (target <= one job duration, {ONE_JOB} s)")
    print(
        f"C's wait: {f.c_wait:.0f} s   (target <= --reserve-after + one job duration, {RESERVE_AFTER + ONE_JOB:.0f} s)"
    )


async def main_async(hosts: int, half_life: float) -> None:
    print(
        f"trace: A 500 x 1 GPU at t=0, B 20 x 1 GPU at t={B_AT:.0f} s, C 1 x 8 GPUs at t={C_AT:.0f} s;"
        f" jobs {JOB_S[0]}-{JOB_S[1]} s (C's {BIG_JOB_S} s); {hosts} agents x 8 GPUs;"
        f" --reserve-after {RESERVE_AFTER:.0f}, --fairshare-half-life {half_life:g}"
    )
    for fairshare in (True, False):
        t = time.monotonic()
        jobs = await replay(fairshare, hosts, half_life)
        title = "fair share and reservations on" if fairshare else "both off: first come, first served"
        report(title, figures(jobs, hosts), time.monotonic() - t)


def main() -> None:
    hosts = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    half_life = float(sys.argv[2]) if len(sys.argv) > 2 else 86400.0
    asyncio.run(main_async(hosts, half_life))


if __name__ == "__main__":
    main()
