"""Port tunnels (docs/tunnels.md): who may open one into which job's port, and the pairing of the
CLI's stream with the one its agent dials back.

A tunnel into a job is code execution as the run's owner (a notebook's port runs anything), so only
the owner or an admin may open one: a viewer, or a member who does not own the run, is refused.
The job must be running and declare the port: never an arbitrary port of the agent's host.

Pairing the CLI's stream with the one its agent dials back: coordinator/tunnel_registry.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from dstack.coordinator.app.core import Core
from dstack.coordinator.app.ownership import Actor, check_owner
from dstack.coordinator.attempts import wire_job_id
from dstack.coordinator.convert import job_ports
from dstack.coordinator.errors import Conflict, Forbidden, NotFound
from dstack.coordinator.model import JobStatus

# How long the CLI's stream waits for the agent to dial back (it connects to a local port first).
DIAL_BACK_S = 20.0


@dataclass(frozen=True)
class Target:
    """The job's port a tunnel reaches, as the agent knows it."""

    run_name: str
    job_name: str
    agent_id: str
    agent_name: str
    wire_job_id: str  # the attempt's id on the agent protocol (coordinator/attempts.py)
    port: int


def _ports_text(ports: list[int]) -> str:
    return ", ".join(str(p) for p in ports) if ports else "none"


async def resolve(core: Core, actor: Actor, run_name: str, job_name: str, port: int) -> Target:
    """The running job and port `actor` may open a tunnel to, or a domain error that says why not."""

    def load() -> Target:
        run = core.store.run_by_name(run_name)
        check_owner(actor, run.owner, f"open a tunnel into run {run_name}")
        jobs = core.store.jobs_of_runs([run.id])[run.id]
        if job_name:
            jobs = [j for j in jobs if j.job_name == job_name]
            if not jobs:
                raise NotFound(f"run {run_name} has no job {job_name!r}")
        # What the attempt got on its agent (list form and `ports: N` picks), else what the spec declares.
        declared = {j.id: sorted({c for _, c in job_ports(j.spec)} | {c for _, c in j.ports}) for j in jobs}
        serving = [j for j in jobs if port in declared[j.id]]
        if not serving:
            ports = sorted({p for ps in declared.values() for p in ps})
            raise Forbidden(
                f"port {port} is not one of the ports run {run_name} declares ({_ports_text(ports)}): add it to"
                " the workflow's `ports` to reach it"
            )
        job = next((j for j in serving if j.status == JobStatus.RUNNING), serving[0])
        if job.status != JobStatus.RUNNING or job.agent_id is None:
            raise Conflict(
                f"job {job.job_name} of run {run_name} is {job.status.label}, not running: a tunnel reaches a"
                " running job only"
            )
        return Target(run_name, job.job_name, job.agent_id, job.agent_name, wire_job_id(job.id, job.attempt), port)

    return await core.db(load)


def ask_agent(core: Core, target: Target, tunnel_id: str) -> bool:
    """Sends the agent `OpenTunnel` on its Connect stream; False when it is not connected."""
    return core.engine.hub.open_tunnel(target.agent_id, tunnel_id, target.wire_job_id, target.port)
