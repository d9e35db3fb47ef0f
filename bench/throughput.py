"""Control-plane throughput: many trivial jobs through one coordinator and many simulated agents.

The agents are real gRPC clients in this process (register, connect, heartbeat) with a null
runtime: each assignment is answered at once with RUNNING and DONE. Jobs are submitted by
concurrent clients, as single-job runs and as runs of many jobs (a job array).
Usage: python -m bench.throughput [JOBS] [AGENTS] [JOBS_PER_RUN]
"""

from __future__ import annotations

import asyncio
import sys
import time

import grpc
import psutil

from bench._harness import ADMIN, JOIN, Services
from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, client_pb2, client_pb2_grpc, common_pb2

JS = common_pb2.JobStatus


class SimAgent:
    def __init__(self, svc: Services, name: str, done: asyncio.Queue[float]) -> None:
        self.svc, self.name, self.done = svc, name, done

    async def run(self, ready: asyncio.Event) -> None:
        channel = self.svc.aio_channel()
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        inv = common_pb2.Inventory(
            hostname=self.name, cpu_count=64, memory_total_bytes=256 << 30, runtime="null", max_jobs=1000
        )
        reg = await stub.Register(
            agent_pb2.RegisterRequest(name=self.name, inventory=inv), metadata=[("authorization", f"Bearer {JOIN}")]
        )
        call = stub.Connect(metadata=[("authorization", f"Bearer {reg.agent_token}")])
        await call.write(agent_pb2.AgentMessage(hello=agent_pb2.Hello(agent_id=reg.agent_id, inventory=inv)))
        await call.read()
        ready.set()
        while (msg := await call.read()) is not grpc.aio.EOF:
            if msg.assignments:
                now = time.time_ns()
                updates = []
                for a in msg.assignments:
                    updates.append(agent_pb2.JobUpdate(job_id=a.job_id, status=JS.JOB_STATUS_RUNNING, time_ns=now))
                    updates.append(
                        agent_pb2.JobUpdate(
                            job_id=a.job_id,
                            status=JS.JOB_STATUS_DONE,
                            time_ns=now,
                            termination_reason=common_pb2.TERMINATION_REASON_DONE,
                        )
                    )
                await call.write(agent_pb2.AgentMessage(updates=updates))
            for ack in msg.update_acks:
                if ack.status == JS.JOB_STATUS_DONE:
                    self.done.put_nowait(time.monotonic())


async def bench(svc: Services, jobs: int, agents: int, per_run: int, clients: int = 16) -> tuple[float, float]:
    done: asyncio.Queue[float] = asyncio.Queue()
    readies = [asyncio.Event() for _ in range(agents)]
    sims = [asyncio.create_task(SimAgent(svc, f"sim-{i}", done).run(readies[i])) for i in range(agents)]
    await asyncio.gather(*(r.wait() for r in readies))
    channel = svc.aio_channel()
    stub = client_pb2_grpc.ClientServiceStub(channel)
    meta = [("authorization", f"Bearer {ADMIN}")]
    spec = common_pb2.JobSpec(workflow="t", provider="bash", commands=["true"])
    runs = jobs // per_run

    async def submitter(k: int) -> None:
        for _ in range(k, runs, clients):
            req = client_pb2.SubmitRunRequest(workflow="t")
            for j in range(per_run):
                s = req.jobs.add()
                s.CopyFrom(spec)
                s.job_name = f"j{j}"
            await stub.SubmitRun(req, metadata=meta)

    t0 = time.monotonic()
    await asyncio.gather(*(submitter(k) for k in range(clients)))
    submitted = time.monotonic() - t0
    last = t0
    for _ in range(runs * per_run):
        last = await asyncio.wait_for(done.get(), 120)
    for s in sims:
        s.cancel()
    await channel.close()
    return runs * per_run / (last - t0), runs * per_run / submitted


def main() -> None:
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    agents = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    modes = [int(sys.argv[3])] if len(sys.argv) > 3 else [1, 100]
    for per_run in modes:
        svc = Services()
        try:
            svc.start_coordinator()
            assert svc.coordinator is not None
            coord, me = psutil.Process(svc.coordinator.pid), psutil.Process()
            c0, m0, t0 = sum(coord.cpu_times()[:2]), sum(me.cpu_times()[:2]), time.monotonic()
            rate, submit_rate = asyncio.run(bench(svc, jobs, agents, per_run))
            wall = time.monotonic() - t0
            c_cpu, m_cpu = (sum(coord.cpu_times()[:2]) - c0) / wall, (sum(me.cpu_times()[:2]) - m0) / wall
            print(
                f"{jobs} jobs, {agents} simulated agents, {per_run} job(s) per run: {rate:,.0f} jobs/s end to end "
                f"(submit {submit_rate:,.0f} jobs/s); coordinator RSS {svc.coordinator_rss_mib():.0f} MiB, "
                f"CPU: coordinator {c_cpu:.0%} ({c_cpu * wall * 1e3 / jobs:.2f} ms/job), load generator {m_cpu:.0%}"
                " of one core"
            )
        finally:
            svc.stop()


if __name__ == "__main__":
    main()
