"""Runs: submit, look up, list, stop, delete.

A submitted job spec travels as `model.JobSpec`: the encoded dstack.v1.JobSpec plus the fields the
coordinator reads (name, workflow, resources, needs_container, depends_on, inputs). The coordinator
stores a spec and hands it to an agent as it came, so converting all of it to plain Python would be
a second schema with no reader; see model.JobSpec.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import re
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dstack.coordinator.app.core import Core, run_view
from dstack.coordinator.app.key_names import check_key_segment
from dstack.coordinator.app.ownership import Actor, check_owner
from dstack.coordinator.artifacts import check_working_dir
from dstack.coordinator.cache import base_key
from dstack.coordinator.convert import code_to_bytes, job_spec_from_proto, job_spec_proto
from dstack.coordinator.errors import CoordinatorError, InvalidRequest, NotFound, NotStored
from dstack.coordinator.gangs import expand
from dstack.coordinator.model import CodeRef, JobSpec, JobStatus, JobView, RunStatus, RunView
from dstack.coordinator.records import submission_record
from dstack.coordinator.repositories import run_repository
from dstack.coordinator.store.artifacts import container_paths_of
from dstack.coordinator.store.db import CreatedRun, NewJob, RunFilters, RunRow, Store
from dstack.coordinator.store.records import RUN_PART
from dstack.coordinator.templates import spec_with_run_name

T = TypeVar("T")

log = logging.getLogger("dstack.coordinator")

# Tags, and the workflow names an uploaded artifact set stands for.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_tag_name(tag: str) -> None:
    if not NAME.fullmatch(tag):
        raise InvalidRequest(f"invalid tag {tag!r}: letters, digits, '.', '_' and '-', starting with a letter or digit")


@dataclass(frozen=True)
class Submission:
    workflow: str
    jobs: Sequence[JobSpec]
    code: CodeRef = field(default_factory=CodeRef)
    args: Sequence[str] = ()  # extra CLI arguments, recorded for the run
    tag_on_done: str = ""
    priority: int = 0  # orders the owner's own waiting jobs (higher first)
    repository: str = ""  # as the client sent it (coordinator/repositories.py)
    resolved_workflow: str = ""  # JSON: the workflows as the client resolved them, for the run's record
    # `dstack rerun --same-inputs` (app/rerun.py): job name -> the run ids it takes as inputs, in place of
    # resolving its tags and workflow dependencies now; and what the rerun's record says of its origin.
    pinned_inputs: Mapping[str, Sequence[str]] | None = None
    rerun_of: Mapping[str, Any] | None = None


SPECS_PART = "specs"  # the job specs as submitted (before gangs and the run's name): what a rerun submits


def specs_part(jobs: Sequence[JobSpec]) -> dict[str, Any]:
    return {"encoded": [base64.b64encode(j.encoded).decode() for j in jobs]}


def _check(jobs: Sequence[JobSpec]) -> None:
    if not jobs:
        raise InvalidRequest("a run needs at least one job")
    names = [j.job_name for j in jobs]
    if len(set(names)) != len(names) or not all(names):
        raise InvalidRequest("job names within a run must be unique and non-empty")
    for name in names:
        check_key_segment("job name", name)  # it becomes runs/RUN/JOB/... in the store
    for j in jobs:
        unknown = set(j.depends_on) - set(names)
        if unknown:
            raise InvalidRequest(f"job {j.job_name!r} depends on unknown jobs: {', '.join(sorted(unknown))}")
        if j.resources.gpu_count > 1024 or j.resources.cpu < 0:
            raise InvalidRequest(f"job {j.job_name!r}: invalid resources")
        # Its relative artifacts are saved and received under it: it must stay inside the job's code.
        check_working_dir(j.job_name, job_spec_proto(j.encoded).working_dir)


def needing_container(
    job: JobSpec, run_jobs: Sequence[JobSpec], input_runs: Sequence[str], paths_of_run: Callable[[str], Sequence[str]]
) -> JobSpec:
    """The job, marked as needing a container runtime when it saves an absolute artifact path (a folder
    inside its container) or receives one from a job it depends on or a run it takes as input: those
    folders exist only inside containers (protos/container_paths.py). On a pool without a container
    runtime it then waits, saying so, instead of failing on the agent."""
    if job.needs_container:
        return job
    by_name = {j.job_name: j for j in run_jobs}
    sources = [job, *(by_name[d] for d in job.depends_on if d in by_name)]
    if not any(container_paths_of(s.encoded) for s in sources) and not any(paths_of_run(r) for r in input_runs):
        return job
    spec = job_spec_proto(job.encoded)
    spec.needs_container = True
    return job_spec_from_proto(spec)


async def check_tag_movable(core: Core, actor: Actor, repository: str, tag: str) -> None:
    """`dstack run -t TAG` moves TAG (of the run's repository) to the new run when it finishes done:
    if TAG is on another user's run, that changes their run, which only its owner or an admin may
    (checked at submission; the move itself happens at the end)."""
    try:
        tagged = await core.db(core.store.tag, repository, tag)
    except NotFound:
        return
    owner = (await core.db(core.store.run_by_name, tagged.run_name)).owner
    check_owner(actor, owner, f"move tag {tag} (of run {tagged.run_name})")


@dataclass(frozen=True)
class _Prepared:
    """A checked submission: `create` stores it (on the DB thread, in the caller's transaction), `enqueue`
    queues what it stored (on the loop, once committed) and returns the run as stored."""

    create: Callable[[], tuple[CreatedRun, list[JobSpec]]]
    enqueue: Callable[[CreatedRun, list[JobSpec]], RunView]


async def submit(core: Core, owner: str, sub: Submission, actor: Actor | None = None) -> RunView:
    """Stores a new run and queues its jobs; returns the run as stored. `actor`: the submitting
    user (`owner`), with their role, for the ownership checks (None: trusted, e.g. tests)."""
    prepared = await _prepare(core, owner, sub, actor)
    stored = core.db.submit(prepared.create)
    queued: asyncio.Future[RunView] = asyncio.get_running_loop().create_future()

    def enqueue(done: asyncio.Future[tuple[CreatedRun, list[JobSpec]]]) -> None:
        # On the loop, as the DB thread's batch resolves: no task of its own per submission.
        if done.cancelled():
            queued.cancel()
            return
        try:
            run = prepared.enqueue(*done.result())
        except BaseException as e:  # the store's refusal or failure, for the caller
            queued.set_exception(e)
        else:
            queued.set_result(run)

    # Queued by the stored future's own callback: a client that gives up (deadline, Ctrl+C) cancels only
    # its wait, never the queueing of a run that was stored.
    stored.add_done_callback(enqueue)
    return await asyncio.shield(queued)


async def _prepare(core: Core, owner: str, sub: Submission, actor: Actor | None) -> _Prepared:
    """Every check of a submission that can run before its transaction, and the steps that store and queue it."""
    _check(sub.jobs)
    submitted_specs = specs_part(sub.jobs)
    # A multi-node job (resources.nodes > 1) is stored as its gang's members (coordinator/gangs.py).
    expanded = expand(sub.jobs)
    if expanded != list(sub.jobs):  # checked again only where expanding changed something (a gang)
        _check(expanded)
    sub = dataclasses.replace(sub, jobs=expanded)
    if abs(sub.priority) > 1_000_000:
        raise InvalidRequest("--priority must be between -1000000 and 1000000")
    core.limits.take_submission(owner)
    # Touched, not just looked up: the garbage collector (coordinator/gc.py) keeps it until the run names it.
    if sub.code.hash and not await core.db(core.store.touch_code, sub.code.hash):
        # Uploaded straight to the store with a presigned URL: checked once, then recorded.
        size = await core.artifacts.verify_code(sub.code.hash)
        if size is None:
            raise InvalidRequest(f"code {sub.code.hash} was not uploaded")
        await core.db(core.store.add_code, sub.code.hash, size)
    if sub.code.diff_hash and not await core.db(core.store.has_code, sub.code.diff_hash):
        diff_size = await core.artifacts.verify_code(sub.code.diff_hash)
        if diff_size is None:
            raise InvalidRequest(f"code diff {sub.code.diff_hash} was not uploaded")
        await core.db(core.store.add_code, sub.code.diff_hash, diff_size)
    submission_part = submission_record(sub)
    if sub.rerun_of:
        submission_part["rerun_of"] = dict(sub.rerun_of)
    code = code_to_bytes(sub.code)
    if sub.tag_on_done:
        check_tag_name(sub.tag_on_done)
    repository = run_repository(sub.repository, sub.code.repo_url, owner)
    if sub.tag_on_done and actor is not None:
        await check_tag_movable(core, actor, repository, sub.tag_on_done)

    secrets = core.engine.secrets_digest(owner)  # the step cache's: coordinator/cache.py

    def create() -> tuple[CreatedRun, list[JobSpec]]:
        # Counted in the step that stores the run: two submissions at once cannot both pass at the limit.
        # Only where a limit is set: the count reads every waiting job of the owner's unfinished runs.
        if core.limits.max_queued_per_user > 0:
            core.limits.check_queued(owner, core.store.queued_jobs_of(owner), len(sub.jobs))
        # Tag and workflow dependencies resolve now, to the runs they name at submission, in the
        # run's repository (or the one an OWNER/REPO/NAME reference names).
        # One run named twice (by its tag and as its workflow's last done run) is one input, not two that
        # would each bring the same files.
        inputs = [
            list(sub.pinned_inputs[j.job_name])
            if sub.pinned_inputs is not None and j.job_name in sub.pinned_inputs
            else list(
                dict.fromkeys(
                    [core.store.resolve_tag(repository, t).run_id for t in j.input_tags]
                    + [core.store.latest_done_run(repository, w).id for w in j.input_workflows]
                )
            )
            for j in sub.jobs
        ]
        name = core.store.reserve_run_name()
        specs = [
            needing_container(spec_with_run_name(j, name), sub.jobs, job_inputs, core.store.container_paths_of_run)
            for j, job_inputs in zip(sub.jobs, inputs, strict=True)
        ]
        jobs = [
            NewJob(
                job_name=j.job_name,
                spec=j.encoded,
                cpu=j.resources.cpu,
                memory=j.resources.memory_bytes,
                gpu_count=j.resources.gpu_count,
                depends_on=list(j.depends_on),
                inputs=job_inputs,
                gang=j.gang,
                node_rank=j.node_rank,
                # Stored with the row (not a second UPDATE per job): keyed on the spec as submitted, before
                # the run's name went in; gang members are not keyed.
                cache_base=base_key(repository, sub.code.hash, submitted.encoded, secrets) if not j.gang else "",
            )
            for j, submitted, job_inputs in zip(specs, sub.jobs, inputs, strict=True)
        ]
        created = core.store.create_run(
            owner,
            sub.workflow,
            code,
            sub.code.hash,
            list(sub.args),
            jobs,
            name,
            sub.tag_on_done,
            sub.priority,
            repository,
        )
        core.store.records.put_parts(
            created.run_id, RUN_PART, {"submission": submission_part, SPECS_PART: submitted_specs}
        )
        return created, specs

    def enqueue(created: CreatedRun, specs: list[JobSpec]) -> RunView:
        # The new run, as the database now holds it, built without reading it back.
        run = RunView(
            name=created.name,
            workflow=sub.workflow,
            owner=owner,
            status=RunStatus.SUBMITTED,
            submitted_at_ns=created.submitted_at,
            code=sub.code,
            repository=repository,
            jobs=[
                JobView(
                    id=job_id,
                    job_name=spec.job_name,
                    status=JobStatus.SUBMITTED,
                    spec=spec.encoded,
                    submitted_at_ns=created.submitted_at,
                )
                for job_id, spec in zip(created.job_ids, specs, strict=True)
            ],
        )
        core.engine.enqueue_run(
            created.run_id,
            list(zip(created.job_ids, specs, strict=True)),
            owner=owner,
            priority=sub.priority,
            submitted_at=created.submitted_at,
            workflow=sub.workflow,
        )
        return run

    return _Prepared(create, enqueue)


MAX_SUBMIT_BATCH = 1000  # SubmitRuns: runs per call at most


async def submit_many(
    core: Core, owner: str, subs: Sequence[Submission], actor: Actor | None = None
) -> list[RunView | CoordinatorError]:
    """Each submission as `submit` stores it, all in one transaction on the DB thread.

    A refused run (a limit, an unknown tag: a CoordinatorError) is undone alone, with a savepoint, and its
    error takes its place: the others are submitted. Anything else that fails while storing (a full disk, a
    database error) undoes the whole call, and NotStored says so: nothing of it was stored, so the client
    may send it again without submitting any run twice."""
    if len(subs) > MAX_SUBMIT_BATCH:
        raise InvalidRequest(f"at most {MAX_SUBMIT_BATCH} runs per call, not {len(subs)}")
    checked = await asyncio.gather(*(_prepare(core, owner, s, actor) for s in subs), return_exceptions=True)
    for r in checked:
        if isinstance(r, BaseException) and not isinstance(r, CoordinatorError):
            raise r  # not a refusal of this run: the call fails, as SubmitRun would (nothing is stored yet)
    todo = [(i, p) for i, p in enumerate(checked) if isinstance(p, _Prepared)]
    failed_at: list[int] = []  # the run whose storing failed, when one did

    def create_all() -> list[tuple[CreatedRun, list[JobSpec]] | CoordinatorError]:
        conn = core.store.conn
        out: list[tuple[CreatedRun, list[JobSpec]] | CoordinatorError] = []
        for i, p in todo:
            conn.execute("SAVEPOINT submitted_run")
            try:
                out.append(p.create())
            except CoordinatorError as e:
                conn.execute("ROLLBACK TO submitted_run")
                out.append(e)
            except BaseException:
                failed_at.append(i)
                raise  # the DB thread undoes this whole call (its savepoint), every run before this one too
            conn.execute("RELEASE submitted_run")
        return out

    async def store_and_enqueue() -> list[RunView | CoordinatorError]:
        try:
            created = await core.db(create_all)
        except Exception as e:
            if not isinstance(e, sqlite3.Error):
                log.warning("storing a batch of %d runs failed; none stored", len(subs), exc_info=True)
            where = f"run {failed_at[0] + 1} of the {len(subs)}" if failed_at else f"the {len(subs)} runs"
            raise NotStored(
                f"the coordinator's database failed while storing {where} in this call ({e}): none of the"
                f" {len(subs)} runs was stored, so sending them again submits each once"
            ) from None
        stored = {i: (p, c) for (i, p), c in zip(todo, created, strict=True)}
        out: list[RunView | CoordinatorError] = []
        for i, r in enumerate(checked):
            if isinstance(r, CoordinatorError):
                out.append(r)  # refused before its transaction
                continue
            p, c = stored[i]
            out.append(c if isinstance(c, CoordinatorError) else p.enqueue(*c))
        return out

    # Shielded: a client that gives up must not leave stored runs unqueued.
    return await asyncio.shield(store_and_enqueue())


async def get(core: Core, name: str) -> RunView:
    return await core.run(name)


async def get_then(core: Core, name: str, then: Callable[[RunView], T]) -> T:
    """`then` of the run as `get` returns it, run on the reader thread (GetRun makes its response there): the
    event loop only hands the call over and takes the answer back, as for ListRuns (`list_runs_page`)."""

    def load(store: Store) -> T:
        return then(core.load_run(store, name))

    return await core.read(load)


MAX_LISTING_PAGE = 1000  # ListRuns (`dstack ps`): runs per page at most, and by default


@dataclass(frozen=True)
class RunsListing:
    """One ListRuns page: its runs, the next page's token ("" after the last), and, when asked for, the
    latest finished runs that the page stopped before (store/runs.py listing_page)."""

    runs: list[RunView]
    next_token: str
    finished: list[RunView]


async def list_runs_page(
    core: Core,
    include_all: bool,
    limit: int,
    token: str,
    then: Callable[[RunsListing], T],
    with_finished: bool = False,
) -> T:
    """`then` of one page of runs and the token of the next ("" after the last): no run is left out however
    many are active (`list_runs` below stops at its limit). `then` runs on the reader thread (it makes the
    service's response): a listing asked for while the event loop is busy with thousands of agents waits
    for the loop once, not once more to hand the page to a thread of its own."""
    size = min(limit or MAX_LISTING_PAGE, MAX_LISTING_PAGE)

    def views(store: Store, rows: list[RunRow]) -> list[RunView]:
        ids = [r.id for r in rows]
        jobs, tags = store.jobs_of_runs(ids), store.tags_of_runs(ids)
        return [run_view(r, jobs[r.id], tags[r.id], core.engine.pending_reasons, core.engine.wait_info) for r in rows]

    def load(store: Store) -> T:
        page = store.runs_listing_page(include_all, size, token, with_finished)
        return then(RunsListing(views(store, page.rows), page.next_token, views(store, page.finished)))

    return await core.read(load)


async def list_runs(core: Core, include_all: bool, limit: int = 0) -> list[RunView]:
    def load(store: Store) -> list[RunView]:
        rows = store.list_runs(include_all, limit or 1000)
        ids = [r.id for r in rows]
        jobs, tags = store.jobs_of_runs(ids), store.tags_of_runs(ids)
        return [run_view(r, jobs[r.id], tags[r.id], core.engine.pending_reasons, core.engine.wait_info) for r in rows]

    return await core.read(load)


async def stop(core: Core, actor: Actor, name: str) -> RunView:
    run = await core.db(core.store.run_by_name, name)
    check_owner(actor, run.owner, f"stop run {name}")
    await asyncio.shield(core.engine.stop_run(name))  # stop messages go out even if the client leaves
    return await core.run(name)


async def preempt(core: Core, name: str) -> tuple[int, RunView]:
    """Preempts the run's interruptible jobs that are on agents (`dstack stop --preempt`): each is
    stopped with its grace period and requeued as a new attempt; returns how many, and the run."""
    run = await core.run(name)
    ids = [j.id for j in run.jobs]
    n = await asyncio.shield(core.engine.preempt(ids, "preempted by an admin (`dstack stop --preempt`)"))
    return n, await core.run(name)


async def delete(core: Core, actor: Actor, name: str) -> int:
    """Deletes a finished run, its logs and artifacts; returns how many objects were deleted."""
    check_owner(actor, (await core.db(core.store.run_by_name, name)).owner, f"remove run {name}")
    run = await core.db(core.store.deletable_run, name)
    # Objects first: if this fails halfway, the run is still listed and `dstack rm` can be repeated.
    deleted = await core.artifacts.delete_run(run.name)
    await core.db(core.store.delete_run, run.id)
    return deleted


MAX_PAGE = 500


@dataclass(frozen=True)
class RunPage:
    runs: list[RunView]
    # Where the next page starts ((submitted_at, id) of the last run here); None: this was the last page.
    next_after: tuple[int, str] | None


async def page_runs(core: Core, filters: RunFilters, limit: int = 100, after: tuple[int, str] | None = None) -> RunPage:
    """One page of runs, newest first, with jobs and tags: every run once across pages (keyset paging)."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE}, not {limit}")

    def load(store: Store) -> tuple[list[RunView], tuple[int, str] | None]:
        rows = store.runs_page(filters, limit + 1, after)  # one more: is there a next page?
        more = len(rows) > limit
        rows = rows[:limit]
        ids = [r.id for r in rows]
        jobs, tags = store.jobs_of_runs(ids), store.tags_of_runs(ids)
        views = [run_view(r, jobs[r.id], tags[r.id], core.engine.pending_reasons, core.engine.wait_info) for r in rows]
        return views, ((rows[-1].submitted_at, rows[-1].id) if more else None)

    views, next_after = await core.read(load)
    return RunPage(views, next_after)
