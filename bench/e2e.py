"""End to end with real processes: N jobs running `true` through a coordinator and local agents.

Usage: python -m bench.e2e [JOBS] [AGENTS] [JOBS_PER_RUN] [--plaintext] [--agent-arg ARG ...]
       python -m bench.e2e [JOBS] [AGENTS] --slurm [--rounds R] [--latency N]

--plaintext: no TLS on either side (what TLS costs); --agent-arg: passed to each agent, e.g.
`--agent-arg=--job-user --agent-arg=none` (as root: jobs as the agent's user, no setpriv);
--profile-coordinator FILE: the coordinator under bench.profiled (every thread under cProfile).
--slurm: the same single-job runs side by side with a private Slurm (bench/slurm.py; needs root and
slurm-wlm + munge, `scripts/bench-deps.sh`), taking turns, plus runs of 100 jobs against job arrays of
100 (--no-batched: not), submit -> start and attached-run latency; --plaintext and --agent-arg apply to dstack.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench._harness import REPO, Services, meta
from bench.slurm import (
    BATCH,
    SCHED_PARAMS,
    Figures,
    SlurmFailed,
    SlurmMissing,
    cpu_of,
    load,
    median,
    p99,
    parse_epoch,
    require_slurm,
    side_by_side,
    slurm_round,
    slurm_version,
    start_slurm,
)
from dstack.protos.v1 import client_pb2, client_pb2_grpc, common_pb2

FINISHED = (common_pb2.RUN_STATUS_DONE, common_pb2.RUN_STATUS_FAILED, common_pb2.RUN_STATUS_STOPPED)


@dataclass
class Round:
    rate: float  # jobs/s, first submission -> last run finished
    wall: float
    submitted: float  # when the last submission returned
    failed: int
    cpu: list[float]  # share of one core over the round: the coordinator, then each agent
    # The jobs' own processes (setpriv, bash), seconds in all: the agents' reaped children's CPU time, and
    # a root agent's job-user spawner's (alive through the round) with the jobs it reaped.
    jobs_cpu: float = 0.0


def jobs_cpu(agents: list[psutil.Process]) -> float:
    """CPU seconds of the agents' reaped children, and of their live children with what those reaped (a
    root agent's job-user spawner, agent/spawner.py, which starts and reaps its jobs)."""
    total = 0.0
    for agent in agents:
        total += sum(agent.cpu_times()[2:4])
        for child in agent.children():
            with contextlib.suppress(psutil.Error):
                total += sum(child.cpu_times()[:4])
    return total


def submit_and_wait(svc: Services, jobs: int, per_run: int) -> Round:
    """JOBS jobs of `true` in runs of PER_RUN, from 16 concurrent gRPC submitters, until every run ended."""
    stub = svc.client_stub()
    spec = common_pb2.JobSpec(workflow="t", provider="bash", commands=["true"])
    req = client_pb2.SubmitRunRequest(workflow="t")
    for j in range(per_run):
        s = req.jobs.add()
        s.CopyFrom(spec)
        s.job_name = f"j{j}"

    async def submit_all() -> list[str]:
        # An efficient load generator: it shares the 2 cores with what it measures.
        async with svc.aio_channel() as channel:
            astub = client_pb2_grpc.ClientServiceStub(channel)
            names: list[str] = []

            async def worker(k: int) -> None:
                for _ in range(k, jobs // per_run, 16):
                    names.append((await astub.SubmitRun(req, metadata=meta())).run.name)

            await asyncio.gather(*(worker(k) for k in range(16)))
            return names

    procs = [psutil.Process(p.pid) for p in svc.procs]
    cpu0 = [sum(p.cpu_times()[:2]) for p in procs]
    children0 = jobs_cpu(procs[1:])
    t0 = time.monotonic()
    names = asyncio.run(submit_all())
    submitted = time.monotonic() - t0
    failed = 0
    for name in names:  # most are done by the time they are asked about
        while (status := stub.GetRun(client_pb2.GetRunRequest(name=name), metadata=meta()).run.status) not in FINISHED:
            time.sleep(0.02)
        failed += status != common_pb2.RUN_STATUS_DONE
    wall = time.monotonic() - t0
    cpu = [(sum(p.cpu_times()[:2]) - c) / wall for p, c in zip(procs, cpu0, strict=True)]
    children = jobs_cpu(procs[1:]) - children0
    return Round(jobs / wall, wall, submitted, failed, cpu, children)


def run(
    jobs: int,
    agents: int,
    per_run: int,
    tls: bool = True,
    agent_args: tuple[str, ...] = (),
    profile_agents: str = "",
    profile_coordinator: str = "",
) -> None:
    # BENCH_TREE (bench.e2e_ab --bench-from): the coordinator and agents run another source tree's code, this
    # bench measures them (the jobs' processes' CPU, which an older bench.e2e does not print).
    svc = Services(tls=tls, tree=Path(os.environ.get("BENCH_TREE") or REPO))
    if profile_agents:  # each agent under bench.profiled: PROFILE_AGENTS-<pid>.prof, written as it stops
        svc.agent_wrap = ["-m", "bench.profiled"]
        svc.env = {"PROFILE_MODULE": "dstack.agent", "PROFILE_OUT": profile_agents + "-{pid}.prof"}
    if profile_coordinator:  # the coordinator under bench.profiled, its pstats file written as it stops
        svc.coordinator_module = "bench.profiled"
        svc.coordinator_env = {"PROFILE_OUT": profile_coordinator}
    try:
        start(svc, agents, agent_args)
        r = submit_and_wait(svc, jobs, per_run)
        print(
            f"{jobs} jobs of `true` on {agents} local agent(s), {per_run} per run: {r.rate:,.0f} jobs/s "
            f"({r.wall:.2f} s, all submitted after {r.submitted:.2f} s, {r.failed} failed); "
            f"coordinator RSS {svc.coordinator_rss_mib():.0f} MiB; "
            f"CPU (share of one core): coordinator {r.cpu[0]:.0%}, agents {', '.join(f'{c:.0%}' for c in r.cpu[1:])};"
            f" CPU per job: coordinator {r.cpu[0] * r.wall / jobs * 1e3:.2f} ms,"
            f" agents {sum(r.cpu[1:]) * r.wall / jobs * 1e3:.2f} ms, jobs' processes {r.jobs_cpu / jobs * 1e3:.2f} ms"
        )
    finally:
        svc.stop()


def start(svc: Services, agents: int, agent_args: tuple[str, ...] = ()) -> None:
    svc.start_coordinator()
    for i in range(agents):
        svc.start_agent(f"local-{i}", *agent_args)
    svc.wait_agents(agents)


class DstackCli:
    """The dstack CLI against these services, as a user runs it: a project with two one-job workflows."""

    def __init__(self, svc: Services) -> None:
        self.project = svc.tmp / "project"
        (self.project / ".dstack").mkdir(parents=True)
        (self.project / ".dstack" / "workflows.yaml").write_text(
            "workflows:\n"
            "  - name: first\n    provider: bash\n    commands: ['echo started $EPOCHREALTIME']\n"
            "  - name: noop\n    provider: bash\n    commands: ['true']\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSTACK_")}
        # Bytecode written once, as for an installed CLI (see bench.cli_latency).
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.env = {
            **env,
            **svc.cli_env(),
            "DSTACK_HOME": str(svc.tmp / "cli-home"),
            "PYTHONPYCACHEPREFIX": str(svc.tmp / "pycache"),
        }
        self.argv = [sys.executable, "-m", "dstack.cli", "run"]
        self.attached()  # warm-up: bytecode, the CLI's home

    def first_line(self) -> tuple[float, float]:
        """`dstack run first`: (-> the job's own start time, -> its line printed by the CLI), seconds."""
        t0 = time.time()
        proc = subprocess.Popen(
            [*self.argv, "first"], cwd=self.project, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert proc.stdout is not None
        seen: list[bytes] = []
        result: tuple[float, float] | None = None
        for raw in proc.stdout:
            seen.append(raw)
            if result is None and b"started " in raw:
                result = (parse_epoch(raw.decode()) - t0, time.time() - t0)
        if proc.wait() != 0 or result is None:
            raise RuntimeError(f"dstack run first exited {proc.returncode}: {b''.join(seen).decode()[-2000:]}")
        return result

    def floor(self) -> float:
        """A Python process importing what the CLI imports first (`python -c 'import grpc, typer'`, as
        bench.cli_latency): the part of each `dstack run` figure that sbatch and srun, C programs, do not pay."""
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "import grpc, typer"], env=self.env, check=True)
        return time.monotonic() - t0

    def attached(self) -> float:
        """`dstack run noop` (`true`), attached, to its exit (as `srun true`), seconds."""
        t0 = time.monotonic()
        r = subprocess.run([*self.argv, "noop"], cwd=self.project, env=self.env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"dstack run noop exited {r.returncode}: {(r.stdout + r.stderr)[-2000:]}")
        return time.monotonic() - t0


def compare_with_slurm(
    jobs: int,
    agents: int,
    rounds: int,
    latency: int,
    cpus: int | None = None,
    sched_params: str = SCHED_PARAMS,
    batched: bool = True,
    tls: bool = True,
    agent_args: tuple[str, ...] = (),
) -> None:
    """dstack (TLS coordinator, AGENTS real agents) and a private Slurm (bench.slurm) side by side, taking
    turns round by round (which goes first alternates): throughput of single-job runs (and of runs of 100
    jobs against job arrays of 100), submit -> start, and an attached run of `true` to its exit; medians and
    dstack/Slurm printed at the end."""
    slurm = start_slurm(cpus or 64 * agents, sched_params)
    svc = Services(tls=tls)
    try:
        start(svc, agents, agent_args)
        cli = DstackCli(svc)
        print(
            f"dstack: coordinator ({'TLS' if tls else 'plaintext'}) + {agents} agent(s), extra args {list(agent_args)};"
            f" Slurm {slurm_version()}: one node, "
            f"{slurm.cpus} job slots, SchedulerParameters={sched_params}; {os.cpu_count()} cores; load {load()}"
        )
        d, s = Figures(), Figures()
        d_batched, s_batched = Figures(), Figures()
        floor: list[float] = []

        def dstack_round() -> None:
            c0 = cpu_of(slurm.pids())
            t0 = time.monotonic()
            r = submit_and_wait(svc, jobs, 1)
            d.throughput.append(r.rate)
            d.not_done += r.failed
            print(
                f"  dstack: {jobs} single-job runs of `true`: {r.rate:,.1f} jobs/s (submitted in {r.submitted:.2f} s,"
                f" {r.failed} failed); CPU per job: coordinator {r.cpu[0] * r.wall / jobs * 1e3:.2f} ms,"
                f" agents {sum(r.cpu[1:]) * r.wall / jobs * 1e3:.2f} ms",
                flush=True,
            )
            if batched:
                r = submit_and_wait(svc, jobs, BATCH)
                d_batched.throughput.append(r.rate)
                d_batched.not_done += r.failed
                print(
                    f"  dstack: {jobs // BATCH} runs of {BATCH} jobs of `true`: {r.rate:,.1f} jobs/s"
                    f" (submitted in {r.submitted:.2f} s, {r.failed} runs failed)",
                    flush=True,
                )
            for _ in range(latency):
                to_start, to_line = cli.first_line()
                d.to_start.append(to_start)
                d.to_first_line.append(to_line)
                d.attached.append(cli.attached())
                floor.append(cli.floor())
            s.idle_cpu.append((cpu_of(slurm.pids()) - c0) / (time.monotonic() - t0))

        def slurm_turn() -> None:
            pids = [p.pid for p in svc.procs]
            c0 = cpu_of(pids)
            t0 = time.monotonic()
            slurm_round(slurm, s, jobs, latency, s_batched if batched else None)
            d.idle_cpu.append((cpu_of(pids) - c0) / (time.monotonic() - t0))

        for i in range(rounds):
            print(f"round {i + 1}/{rounds} (load {load()})", flush=True)
            for turn in (dstack_round, slurm_turn) if i % 2 == 0 else (slurm_turn, dstack_round):
                turn()
        ms = 1e3
        print(f"\nmedians over {rounds} round(s) of {jobs} jobs and {rounds * latency} latency samples; load {load()}")
        print(
            side_by_side(
                [
                    ("single-job runs of `true` end to end", "jobs/s", d.throughput, s.throughput),
                    (
                        f"jobs of `true` in runs of {BATCH} / `sbatch --array` of {BATCH}",
                        "jobs/s",
                        d_batched.throughput,
                        s_batched.throughput,
                    ),
                    (
                        "submit -> the job starts (`dstack run` / `sbatch`), p50",
                        "ms",
                        [x * ms for x in d.to_start],
                        [x * ms for x in s.to_start],
                    ),
                    (
                        "submit -> the job starts, p99",
                        "ms",
                        [p99(d.to_start) * ms] if d.to_start else [],
                        [p99(s.to_start) * ms] if s.to_start else [],
                    ),
                    (
                        "`dstack run` -> the job's first line at the client, p50",
                        "ms",
                        [x * ms for x in d.to_first_line],
                        [],
                    ),
                    (
                        "run `true` attached, to its exit (`dstack run` / `srun`), p50",
                        "ms",
                        [x * ms for x in d.attached],
                        [x * ms for x in s.attached],
                    ),
                    (
                        "run `true` attached, p99",
                        "ms",
                        [p99(d.attached) * ms] if d.attached else [],
                        [p99(s.attached) * ms] if s.attached else [],
                    ),
                    ("`python -c 'import grpc, typer'` (the CLI's floor), p50", "ms", [x * ms for x in floor], []),
                ]
            )
        )
        print(
            f"failed or not COMPLETED: dstack {d.not_done + d_batched.not_done},"
            f" Slurm {s.not_done + s_batched.not_done}; idle system's CPU while the other ran"
            f" (share of a core, median): dstack {median(d.idle_cpu):.1%}, Slurm {median(s.idle_cpu):.1%}"
        )
    finally:
        svc.stop()
        slurm.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jobs", type=int, nargs="?", default=1000)
    p.add_argument("agents", type=int, nargs="?", default=2)
    p.add_argument("per_run", type=int, nargs="?", help="jobs per run (default: 1, then 100)")
    p.add_argument("--plaintext", action="store_true", help="no TLS (coordinator and agents --insecure)")
    p.add_argument("--agent-arg", action="append", default=[], help="an argument for each agent (repeatable)")
    p.add_argument(
        "--slurm",
        action="store_true",
        help="side by side with a private Slurm on this machine (bench.slurm), taking turns",
    )
    p.add_argument("--rounds", type=int, default=3, help="with --slurm: rounds of each (default: %(default)s)")
    p.add_argument(
        "--latency", type=int, default=10, help="with --slurm: latency samples per round (default: %(default)s)"
    )
    p.add_argument("--no-batched", action="store_true", help="with --slurm: single-job runs only, no runs of 100")
    p.add_argument(
        "--profile-agents",
        default="",
        metavar="PREFIX",
        help="each agent under bench.profiled (every thread under cProfile): PREFIX-<pid>.prof",
    )
    p.add_argument(
        "--profile-coordinator",
        default="",
        metavar="FILE",
        help="the coordinator under bench.profiled (every thread under cProfile): a pstats file",
    )
    a = p.parse_args()
    if a.slurm:
        try:
            require_slurm()
        except SlurmMissing as e:
            print(f"bench.e2e: {e}", file=sys.stderr)
            sys.exit(2)
        try:
            compare_with_slurm(
                a.jobs,
                a.agents,
                a.rounds,
                a.latency,
                batched=not a.no_batched,
                tls=not a.plaintext,
                agent_args=tuple(a.agent_arg),
            )
        except SlurmFailed as e:
            print(f"bench.e2e: Slurm failed: {e}", file=sys.stderr)
            sys.exit(1)
        return
    for per_run in [a.per_run] if a.per_run else [1, 100]:
        run(a.jobs, a.agents, per_run, not a.plaintext, tuple(a.agent_arg), a.profile_agents, a.profile_coordinator)


if __name__ == "__main__":
    main()
