"""`dstack rerun RUN [--same-inputs] [--pin]` (docs/reproducibility.md): a new run from a finished run's record.

What is submitted again is what the coordinator kept, never what the client has now: the code blob by its
hash (the working tree is not packed again), the job specs as they were submitted (after variables,
overrides and `${{ }}`; before gangs were expanded and the run's name filled in), the repository, and with
`same_inputs` the very runs each job took as inputs (not what its tags and workflow names give now).

Who may: whoever may read the old run (every user: runs are the team's) and submit runs in its repository
(a member or an admin; another user's local repository is theirs alone). A run that has not finished is
refused: its record is not complete, so nothing could be compared with it.

What cannot be reproduced exactly is said at submission where the coordinator knows it (an input that is
gone, a tag that names another run now, an image or requirements it cannot pin); what only the job knows
(the image's digest, what pip resolved, the GPUs) the CLI compares from the two records when the rerun
ends (`dstack diff`).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from dstack.coordinator.app.core import Core
from dstack.coordinator.app.ownership import Actor
from dstack.coordinator.app.records import run_record
from dstack.coordinator.app.runs import SPECS_PART, Submission, submit
from dstack.coordinator.convert import job_spec_from_bytes, job_spec_gang, job_spec_image, pinned_job_spec
from dstack.coordinator.errors import Conflict, Forbidden, InvalidRequest, NotFound
from dstack.coordinator.model import JobSpec, RunStatus, RunView
from dstack.coordinator.repositories import local_repository_user
from dstack.coordinator.store.base import json_list
from dstack.coordinator.store.records import RUN_PART
from dstack.coordinator.store.secrets import TEAM, SecretRow

FINISHED = (RunStatus.DONE, RunStatus.FAILED, RunStatus.STOPPED)
# A `pip freeze` line pip accepts in a constraints file: NAME==VERSION (editables and direct URLs are not).
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
PINNABLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+")
# Written by the first command of a pinned job: pip (in the job, and in the agent's environment helper,
# whose environment cache keys on it) reads PIP_CONSTRAINT as `pip install -c`.
CONSTRAINTS_ENV = "DSTACK_PIP_CONSTRAINTS"
CONSTRAINTS_FILE = ".dstack-constraints.txt"
PIN_COMMAND = (
    f'printf \'%s\\n\' "${CONSTRAINTS_ENV}" > "$PWD/{CONSTRAINTS_FILE}"'
    f' && export PIP_CONSTRAINT="$PWD/{CONSTRAINTS_FILE}"'
)
MAX_CONSTRAINTS = 96 * 1024  # one environment variable's value stays well under Linux's 128 KiB


@dataclass(frozen=True)
class Rerun:
    run: RunView
    notes: list[str]


def _finished(run: RunView) -> None:
    if run.status not in FINISHED:
        raise Conflict(
            f"run {run.name} has not finished ({run.status.name.lower()}): its record is not complete yet."
            f" Wait for it (`dstack logs {run.name} -f`) or stop it (`dstack stop {run.name}`), then rerun it"
        )


def _repository(run: RunView, actor: Actor) -> str:
    """The repository to submit the rerun to, as a client names it (a local one without its user)."""
    local = local_repository_user(run.repository)
    if local is None:
        return run.repository
    user, folder = local
    if user != actor.name:
        raise Forbidden(
            f"run {run.name} is in {user}'s local repository {run.repository}: only {user} may submit"
            " runs there (push the code to a shared remote to rerun each other's runs)"
        )
    return f"local/{folder}"


def _submitted_specs(core: Core, run: RunView) -> tuple[list[bytes], list[str]]:
    """On the DB thread: the specs as submitted; a run from before they were kept: its stored specs."""
    row = core.store.run_by_name(run.name)
    if row.kind == "upload":
        raise InvalidRequest(f"run {run.name} is an uploaded artifact set, not a workflow run: nothing to rerun")
    parts = core.store.records.of_run(row.id)
    kept = parts.get((RUN_PART, SPECS_PART))
    if kept:
        return [base64.b64decode(e) for e in kept["encoded"]], []
    if any(job_spec_gang(j.spec) for j in run.jobs):
        raise InvalidRequest(
            f"run {run.name} was submitted before dstack kept job specs as submitted, and it has a multi-node"
            " job: it cannot be rerun; run the workflow again with `dstack run`"
        )
    note = f"run {run.name} predates kept specs: `${{{{ run.name }}}}` stays {run.name}"
    return [j.spec for j in run.jobs], [note]


def _pinned_inputs(core: Core, run: RunView) -> dict[str, list[str]]:
    """On the DB thread: job name -> the input runs it took, each still there with its artifacts."""
    row = core.store.run_by_name(run.name)
    out: dict[str, list[str]] = {}
    found = core.store.rows("SELECT job_name, inputs FROM jobs WHERE run_id = ?", [row.id])
    for r in found:
        ids = [str(i) for i in json_list(r["inputs"])]
        for run_id in ids:
            try:
                source = core.store.runs.by_id(run_id)
            except NotFound:
                raise NotFound(
                    f"an input of job {r['job_name']} of run {run.name} was deleted (`dstack rm`): the same inputs"
                    " cannot be taken; rerun without --same-inputs to take what its tags and workflows name now"
                ) from None
            if source.artifacts_deleted:
                raise NotFound(
                    f"the artifacts of run {source.name}, an input of job {r['job_name']} of run {run.name}, were"
                    " deleted by the retention policy: the same inputs cannot be taken; rerun without --same-inputs"
                )
        out[r["job_name"]] = ids
    return out


def _input_notes(core: Core, run: RunView, repository: str, specs: list[JobSpec]) -> list[str]:
    """On the DB thread: the jobs whose tags or workflows now name other runs than the old run took."""
    row = core.store.run_by_name(run.name)
    took = {
        r["job_name"]: set(json_list(r["inputs"]))
        for r in core.store.rows("SELECT job_name, inputs FROM jobs WHERE run_id = ?", [row.id])
    }
    notes = []
    for spec in specs:
        now: dict[str, str] = {}
        try:
            now |= {f"tag {t}": core.store.resolve_tag(repository, t).run_id for t in spec.input_tags}
            now |= {f"workflow {w}": core.store.latest_done_run(repository, w).id for w in spec.input_workflows}
        except NotFound:
            continue  # the submission says which (and fails)
        old = took.get(spec.job_name, set())
        for what, run_id in now.items():
            if run_id not in old:
                name = core.store.runs.by_id(run_id).name
                notes.append(
                    f"job {spec.job_name}: {what} now names run {name}, not what run {run.name} took;"
                    " --same-inputs takes the old inputs"
                )
    return notes


def _secret_notes(core: Core, run: RunView, caller: str) -> list[str]:
    """On the DB thread: the secrets whose value the rerun may get otherwise than the old run's jobs did.
    Values are never read here: a secret set (again) after the old run's first job started may have another
    value; one the caller has personally, or the old owner had, is another value than the other's."""
    started = min((j.started_at_ns for j in run.jobs if j.started_at_ns), default=run.submitted_at_ns)
    rows = core.store.secrets.all()

    def visible(owner: str) -> dict[str, SecretRow]:  # as the engine's secrets_for: personal over team
        out = {r.name: r for r in rows if r.owner == TEAM}
        out |= {r.name: r for r in rows if r.owner == owner and owner != TEAM}
        return out

    before, now = visible(run.owner), visible(caller)
    notes = []
    for name in sorted(now):
        row = now[name]
        whose = "your personal" if row.personal else "the team's"
        if row.created_at > started:
            notes.append(f"secret {name} did not exist when run {run.name} ran: the rerun gets {whose} value")
        elif name in before and (before[name].owner, before[name].name) != (row.owner, row.name):
            notes.append(f"secret {name}: the rerun gets {whose} value, not the one run {run.name} got ({run.owner}'s)")
        elif row.updated_at > started:
            notes.append(f"secret {name} was set again after run {run.name} ran: its value may differ")
    return notes


def _image_pin(image: str, env: dict[str, Any]) -> tuple[str, str]:
    """(the image by its recorded digest or "", a note)."""
    if "@sha256:" in image:
        return "", ""
    repo = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    # Only a digest of the image's own repository, well formed: the agent that reported them is not trusted
    # to send the rerun to another image.
    names = (repo, f"docker.io/{repo}", f"docker.io/library/{repo}")
    digests = [
        d.split("@", 1)[1]
        for d in env.get("image_digests") or []
        if isinstance(d, str) and "@" in d and d.split("@", 1)[0] in names and DIGEST.fullmatch(d.split("@", 1)[1])
    ]
    if not digests:
        image_id = env.get("image_id") or "unknown"
        return "", f"image {image} has no registry digest of {repo} in the record (ID {image_id}): it runs by its tag"
    pinned = f"{repo}@{digests[0]}"
    return pinned, f"image {image} pinned to {pinned}"


def _constraints(env: dict[str, Any]) -> tuple[str, int, int]:
    """(constraints text, lines pinned, lines left out) from the recorded `pip freeze`."""
    lines = [ln.strip() for ln in str(env.get("packages") or "").splitlines() if ln.strip()]
    kept = [ln for ln in lines if PINNABLE.fullmatch(ln)]
    size, fits = 0, 0
    for line in kept:  # as many as one environment variable holds
        size += len(line) + 1
        if size > MAX_CONSTRAINTS:
            break
        fits += 1
    kept = kept[:fits]
    return "\n".join(kept), len(kept), len(lines) - len(kept)


def _pin(spec: JobSpec, job: dict[str, Any] | None) -> tuple[JobSpec, list[str]]:
    """The spec with its image by digest and pip constrained to the recorded freeze, as far as recorded."""
    env = (job or {}).get("environment") or {}
    if not env:
        return spec, [f"job {spec.job_name}: the old run recorded no environment for it: nothing to pin"]
    image = job_spec_image(spec.encoded)
    notes = []
    pinned = ""
    if image:
        pinned, note = _image_pin(image, env)
        if note:
            notes.append(f"job {spec.job_name}: {note}")
    text, kept, left = _constraints(env)
    spec = pinned_job_spec(spec, pinned, {CONSTRAINTS_ENV: text} if kept else {}, PIN_COMMAND if kept else "")
    if kept:
        more = f"; {left} line(s) left out (not NAME==VERSION, or past {MAX_CONSTRAINTS // 1024} KiB)" if left else ""
        cut = " (the recorded freeze was truncated)" if env.get("packages_truncated") else ""
        notes.append(f"job {spec.job_name}: pip constrained to the {kept} recorded package version(s){more}{cut}")
    if not image and not kept:
        notes.append(f"job {spec.job_name}: nothing to pin (no image, no recorded packages)")
    return spec, notes


def _record_job(record: dict[str, Any], name: str) -> dict[str, Any] | None:
    jobs = record.get("jobs") or []
    for job in jobs:
        if job.get("job_name") == name:
            return dict(job)
    for job in jobs:  # a multi-node job: its master's
        if (job.get("spec") or {}).get("gang") == name and not (job.get("spec") or {}).get("node_rank"):
            return dict(job)
    return None


async def rerun(
    core: Core, actor: Actor, name: str, same_inputs: bool, pin: bool, tag_on_done: str = "", priority: int = 0
) -> Rerun:
    old = await core.run(name)
    _finished(old)
    repository = _repository(old, actor)
    encoded, notes = await core.db(_submitted_specs, core, old)
    specs = [job_spec_from_bytes(e) for e in encoded]
    if old.code.hash and await core.artifacts.verify_code(old.code.hash) is None:
        raise NotFound(
            f"the code of run {name} ({old.code.hash[:12]}) is no longer in the object store: it cannot be rerun;"
            " `dstack run` the workflow from your working tree instead"
        )
    code = old.code
    if code.diff_hash and await core.artifacts.verify_code(code.diff_hash) is None:
        code = dataclasses.replace(code, diff_hash="", diff_size=0)
        notes.append(f"the uncommitted diff of run {name} is gone from the store: the rerun's record has none")
    record = (await run_record(core, name)).record
    if pin:
        pinned = []
        for spec in specs:
            spec, pin_notes = _pin(spec, _record_job(record, spec.job_name))
            pinned.append(spec)
            notes += pin_notes
        specs = pinned
    notes += await core.db(_secret_notes, core, old, actor.name)
    pinned_inputs = await core.db(_pinned_inputs, core, old) if same_inputs else None
    if not same_inputs:
        notes += await core.db(_input_notes, core, old, old.repository, specs)
    sub = Submission(
        workflow=old.workflow,
        jobs=specs,
        code=code,
        args=list(record["run"].get("args") or []),
        tag_on_done=tag_on_done,
        priority=priority,
        repository=repository,
        resolved_workflow=_resolved_text(record),
        pinned_inputs=pinned_inputs,
        rerun_of={"run": name, "same_inputs": same_inputs, "pin": pin, "notes": notes},
    )
    return Rerun(await submit(core, actor.name, sub, actor), notes)


def _resolved_text(record: dict[str, Any]) -> str:
    resolved = record.get("resolved_workflow")
    return json.dumps(resolved, sort_keys=True) if isinstance(resolved, dict) else ""
