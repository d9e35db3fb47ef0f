"""Jobs a 2022 custom provider program added to its own run (issue 13 item 9; agent/provider_jobs.py).

2022's `Provider.start()` submitted each job of `create_jobs()` into the running run with the user's
token (dstackai/dstack 007d79a `cli/dstack/__init__.py` `_submit`: `run_name`, `previous_job_ids` from
`depends_on`, `master_job_id` from `master`). Here the program holds no token: its agent reports the jobs
with the program's DONE, and they join the run in the transaction that records it done
(store/jobs.py apply_updates), checked as a submission is checked, with the run owner's authority:

- the reporting job must be a provider program (JobSpec.provider_program, set by the CLI) and its run's
  owner must still be a user who may submit (member or admin);
- at most MAX_JOBS, each name a key segment, none already in the run;
- `depends_on` only among the new jobs, without cycles; `master` makes a gang (coordinator/gangs.py:
  placed at once, MASTER_ADDR/MASTER_PORT, rank 0 the master), as 2022's `master_job_id` ran the
  workers beside their master;
- working_dir and artifact paths inside the job's code (or a container folder, which then needs a
  container runtime), the owner's queued-jobs limit;
- what a workflow cannot ask for through its program is cleared: tag and workflow inputs, multi-node
  fields, and `provider_program` itself (a provided job adds no jobs of its own).

An impossible resource request is accepted and then waits with the scheduler's usual reason.
Anything else refused fails the program's job with a message that says what (ProvidedJobsRefused).
"""

from __future__ import annotations

import graphlib
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dstack.coordinator.app.key_names import check_key_segment
from dstack.coordinator.artifacts import check_working_dir
from dstack.coordinator.convert import job_spec_from_proto
from dstack.coordinator.errors import CoordinatorError
from dstack.coordinator.ids import new_id
from dstack.coordinator.model import JobSpec
from dstack.coordinator.store.base import rows
from dstack.coordinator.store.runs import NewJob, insert_jobs
from dstack.coordinator.store.users import ADMIN, MEMBER, role_of
from dstack.coordinator.templates import spec_with_run_name
from dstack.protos.artifact_paths import in_code
from dstack.protos.container_paths import check_container_path, is_container_path
from dstack.protos.v1 import common_pb2

MAX_JOBS = 64


class ProvidedJobsRefused(CoordinatorError):
    """The program's jobs cannot join its run; the message says why."""


@dataclass(frozen=True)
class AddedJobs:
    """Jobs just inserted into a running run, for the scheduling queue."""

    run_id: str
    owner: str
    priority: int
    submitted_at: int
    workflow: str
    jobs: list[tuple[str, JobSpec]]
    stored_at: int = 0  # their rows' `submitted_at`: when they were added


QueuedOf = Callable[[str], int]  # the owner's waiting jobs now
CheckQueued = Callable[[str, int, int], None]  # SubmissionLimits.check_queued


def add_provided_jobs(
    c: sqlite3.Connection,
    parent_id: str,
    run_id: str,
    encoded: Sequence[bytes],
    now: int,
    queued_of: QueuedOf,
    check_queued: CheckQueued,
) -> AddedJobs:
    """Checks the reported jobs and inserts them into the run (the caller's transaction)."""
    [parent] = rows(c, "SELECT spec, job_name FROM jobs WHERE id = ?", [parent_id])
    parent_spec = common_pb2.JobSpec.FromString(parent["spec"])
    if not parent_spec.provider_program:
        raise ProvidedJobsRefused(f"job {parent['job_name']!r} is not a provider program: it cannot add jobs")
    [run] = rows(c, "SELECT owner, name, priority, submitted_at, workflow FROM runs WHERE id = ?", [run_id])
    owner = str(run["owner"])
    _check_owner(c, owner)
    if not 0 < len(encoded) <= MAX_JOBS:
        raise ProvidedJobsRefused(f"a provider program may add 1 to {MAX_JOBS} jobs, not {len(encoded)}")
    try:
        protos = [common_pb2.JobSpec.FromString(e) for e in encoded]
    except Exception:  # a hostile agent's bytes
        raise ProvidedJobsRefused("a job spec could not be read") from None
    existing = {r["job_name"] for r in rows(c, "SELECT job_name FROM jobs WHERE run_id = ?", [run_id])}
    specs = _checked(protos, existing, str(run["name"]))
    check_queued(owner, queued_of(owner), len(specs))
    ids = [new_id() for _ in specs]
    new = [
        NewJob(
            job_name=s.job_name,
            spec=s.encoded,
            cpu=s.resources.cpu,
            memory=s.resources.memory_bytes,
            gpu_count=s.resources.gpu_count,
            depends_on=list(s.depends_on),
            gang=s.gang,
            node_rank=s.node_rank,
        )
        for s in specs
    ]
    insert_jobs(c, run_id, list(zip(ids, new, strict=True)), now)
    jobs = list(zip(ids, specs, strict=True))
    return AddedJobs(run_id, owner, int(run["priority"]), int(run["submitted_at"]), str(run["workflow"]), jobs, now)


def _check_owner(c: sqlite3.Connection, owner: str) -> None:
    found = rows(c, "SELECT role FROM users WHERE name = ?", [owner])
    if found:
        role = role_of(found[0]["role"])
        if role not in (ADMIN, MEMBER):
            raise ProvidedJobsRefused(f"the run's owner {owner} is a {role} now and cannot submit jobs")
    elif rows(c, "SELECT 1 FROM users LIMIT 1"):  # a coordinator with users, and the owner is gone
        raise ProvidedJobsRefused(f"the run's owner {owner} is no longer a user")


def _checked(protos: list[common_pb2.JobSpec], existing: set[str], run_name: str) -> list[JobSpec]:
    names = [p.job_name for p in protos]
    for name in names:
        try:
            check_key_segment("job name", name)
        except CoordinatorError as e:
            raise ProvidedJobsRefused(str(e)) from None
    if len(set(names)) != len(names):
        raise ProvidedJobsRefused("the provider's job names must be unique")
    taken = sorted(existing.intersection(names))
    if taken:
        raise ProvidedJobsRefused(f"the run already has a job named {taken[0]!r}")
    gangs: dict[str, list[common_pb2.JobSpec]] = {}
    for p in protos:
        unknown = sorted(set(p.depends_on) - set(names))
        if unknown:
            raise ProvidedJobsRefused(f"job {p.job_name!r} depends on {unknown[0]!r}, not one of the provider's jobs")
        if p.gang:
            if p.gang not in names or p.gang == p.job_name:
                raise ProvidedJobsRefused(f"job {p.job_name!r}: its master must be another of the provider's jobs")
            gangs.setdefault(p.gang, []).append(p)
    try:
        graphlib.TopologicalSorter({p.job_name: set(p.depends_on) for p in protos}).prepare()
    except graphlib.CycleError:
        raise ProvidedJobsRefused("the provider's jobs depend on each other in a cycle") from None
    by_name = {p.job_name: p for p in protos}
    for master, workers in gangs.items():
        if by_name[master].gang:
            raise ProvidedJobsRefused(f"job {master!r} is a master and has a master itself")
        members = [master, *(w.job_name for w in workers)]
        if any(set(by_name[m].depends_on) & set(members) for m in members):
            raise ProvidedJobsRefused(f"the jobs of master {master!r} run together: none may depend on another")
        for rank, m in enumerate(members):
            by_name[m].gang, by_name[m].node_rank, by_name[m].nnodes = master, rank, len(members)
        # 2022's master served on its own first port (`--master_addr $JOB_HOSTNAME --master_port
        # $JOB_PORT_0`): the agent makes those the gang's MASTER_ADDR and MASTER_PORT (agent/runner.py).
        by_name[master].env[MASTER_SERVES_JOB_PORT_0] = "1"
    out = []
    for p in protos:
        _sanitise(p)
        try:
            check_working_dir(p.job_name, p.working_dir)
            for a in p.artifacts:
                if is_container_path(a.path):
                    check_container_path(a.path)
                    p.needs_container = True
                else:
                    in_code(p.working_dir, a.path)
        except (CoordinatorError, ValueError) as e:
            raise ProvidedJobsRefused(f"job {p.job_name!r}: {e}") from None
        if p.resources.gpu.count > 1024 or p.resources.cpu < 0:
            raise ProvidedJobsRefused(f"job {p.job_name!r}: invalid resources")
        out.append(spec_with_run_name(job_spec_from_proto(p), run_name))
    return out


MASTER_SERVES_JOB_PORT_0 = "DSTACK_MASTER_SERVES_JOB_PORT_0"


def _sanitise(p: common_pb2.JobSpec) -> None:
    del p.input_tags[:]
    del p.input_workflows[:]
    p.provider_program = False
    p.resources.nodes = 0
    if not p.gang:
        p.node_rank = p.nnodes = 0
