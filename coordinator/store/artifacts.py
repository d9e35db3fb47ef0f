"""Artifacts: the files each job saved (recorded after the object store has them), the inputs a job
starts with, and uploaded artifact sets (`dstack artifacts upload`: a run whose one job uploads)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from dstack.coordinator import lifecycle
from dstack.coordinator.errors import Conflict, InvalidRequest, NotFound
from dstack.coordinator.ids import new_id
from dstack.coordinator.model import ArtifactFile, ArtifactInput, JobStatus
from dstack.coordinator.store.base import Db, json_list, rows
from dstack.coordinator.store.runs import Runs
from dstack.protos.container_paths import BadContainerPath, check_container_path, is_container_path
from dstack.protos.repos import LEGACY
from dstack.protos.v1 import common_pb2

# (path, size, sha256) of one file a job saved
FileRecord = tuple[str, int, str]


@dataclass(frozen=True)
class ArtifactRow:
    job_id: str
    job_name: str
    path: str
    size: int
    sha256: str

    @classmethod
    def of(cls, r: sqlite3.Row) -> ArtifactRow:
        return cls(r["job_id"], r["job_name"], r["path"], r["size"], r["sha256"])


@dataclass(frozen=True)
class UploadJob:
    """The one job of an unfinished artifact upload."""

    id: str
    job_name: str
    run_id: str
    run_name: str
    tag: str


_SELECT = "SELECT a.job_id, j.job_name, a.path, a.size, a.sha256 FROM artifacts a JOIN jobs j ON j.id = a.job_id"


def _replace(c: sqlite3.Connection, job_id: str, files: Sequence[FileRecord]) -> None:
    c.execute("DELETE FROM artifacts WHERE job_id = ?", [job_id])
    c.executemany(
        "INSERT INTO artifacts (job_id, path, size, sha256) VALUES (?, ?, ?, ?)",
        [(job_id, p, s, h) for p, s, h in files],
    )


def inputs_of(c: sqlite3.Connection, job_id: str) -> list[ArtifactInput]:
    """The artifacts a job starts with: of the jobs it depends on in its run, and of the runs it
    takes as inputs (tag and workflow dependencies), in that order."""
    run_id, depends_on, inputs = c.execute(
        "SELECT run_id, depends_on, inputs FROM jobs WHERE id = ?", [job_id]
    ).fetchone()
    return inputs_from(c, run_id, depends_on, inputs)


def inputs_from(c: sqlite3.Connection, run_id: str, depends_on: str, inputs: str) -> list[ArtifactInput]:
    """`inputs_of` for a job whose row (run_id and its depends_on and inputs columns) was read already."""
    sources: list[tuple[str, str]] = [(run_id, n) for n in json_list(depends_on)]
    for source_run in json_list(inputs):
        sources += [(source_run, r[0]) for r in c.execute("SELECT job_name FROM jobs WHERE run_id = ?", [source_run])]
    out = []
    for source_run, job_name in sources:
        found = rows(
            c,
            "SELECT r.name AS run_name, a.path, a.size, a.sha256 FROM jobs j JOIN runs r ON r.id = j.run_id"
            " JOIN artifacts a ON a.job_id = j.id WHERE j.run_id = ? AND j.job_name = ? ORDER BY a.path",
            [source_run, job_name],
        )
        if found:
            files = [ArtifactFile(job_name, r["path"], r["size"], r["sha256"]) for r in found]
            spec = c.execute(
                "SELECT spec FROM jobs WHERE run_id = ? AND job_name = ?", [source_run, job_name]
            ).fetchone()
            mounts = container_paths_of(spec[0]) if spec is not None else ()
            out.append(ArtifactInput(found[0]["run_name"], job_name, files, mounts))
    return out


def container_paths_of(spec: bytes | None) -> tuple[str, ...]:
    """A stored job spec's absolute artifact paths (folders inside its container), as the agent saved them."""
    if not spec:
        return ()
    out = []
    for a in common_pb2.JobSpec.FromString(spec).artifacts:
        if is_container_path(a.path):
            try:
                out.append(check_container_path(a.path))
            except BadContainerPath:
                continue  # never saved: the agent refused it
    return tuple(out)


class Artifacts:
    def __init__(self, db: Db, runs: Runs) -> None:
        self.db = db
        self.runs = runs

    def save(self, job_id: str, files: Sequence[FileRecord]) -> None:
        with self.db.tx() as c:
            _replace(c, job_id, files)

    def of_run(self, run_id: str) -> list[ArtifactRow]:
        rows = self.db.rows(f"{_SELECT} WHERE j.run_id = ? ORDER BY j.job_name, a.path", [run_id])
        return [ArtifactRow.of(r) for r in rows]

    def container_paths_of_run(self, run_id: str) -> tuple[str, ...]:
        """The absolute artifact paths of a run's jobs: a job taking the run as input mounts them."""
        specs = self.db.rows("SELECT spec FROM jobs WHERE run_id = ?", [run_id])
        return tuple(p for r in specs for p in container_paths_of(r["spec"]))

    def get(self, run_id: str, job_name: str, path: str) -> ArtifactRow:
        row = self.db.row(f"{_SELECT} WHERE j.run_id = ? AND j.job_name = ? AND a.path = ?", [run_id, job_name, path])
        if row is None:
            raise NotFound(f"artifact {path!r} of job {job_name!r} does not exist")
        return ArtifactRow.of(row)

    # ---- uploaded artifact sets (`dstack artifacts upload`) -------------------------------------
    def create_upload_run(self, owner: str, workflow: str, tag: str, repository: str = LEGACY) -> tuple[str, str, str]:
        """A run with one job, already uploading (never queued), in `repository`, where its tag goes;
        returns run id, name and job id."""
        if self.db.row("SELECT 1 FROM tags WHERE repository = ? AND name = ?", [repository, tag]):
            raise Conflict(
                f"tag {tag!r} already exists in repository {repository}: delete it first (`dstack tags delete {tag}`)"
            )
        name = self.runs.reserve_name()
        now = self.db.clock()
        run_id, job_id = new_id(), new_id()
        spec = common_pb2.JobSpec(job_name=workflow, provider="upload").SerializeToString()
        with self.db.tx() as c:
            c.execute(
                "INSERT INTO runs (id, name, owner, workflow, status, termination_reason, message, submitted_at,"
                " code_hash, code, args, queue, priority, tag_on_done, kind, repository) VALUES (?, ?, ?, ?, ?, 0, '',"
                " ?, '', ?, '[]', '', 0, ?, 'upload', ?)",
                [run_id, name, owner, workflow, int(lifecycle.UPLOAD_RUN.dst), now, b"", tag, repository],
            )
            c.execute(
                "INSERT INTO jobs (id, run_id, job_name, spec, status, termination_reason, message, agent_id,"
                " gpu_indices, submitted_at, started_at, stop_requested, cpu, memory, gpu_count, depends_on, inputs)"
                " VALUES (?, ?, ?, ?, ?, 0, '', NULL, '[]', ?, ?, 0, 0, 0, 0, '[]', '[]')",
                [job_id, run_id, workflow, spec, int(lifecycle.UPLOAD.dst), now, now],
            )
        return run_id, name, job_id

    def upload_job(self, run_name: str) -> UploadJob:
        run = self.runs.by_name(run_name)
        job = self.db.row("SELECT id, job_name, status FROM jobs WHERE run_id = ?", [run.id])
        if run.kind != "upload" or job is None:
            raise InvalidRequest(f"run {run_name!r} is not an artifact upload")
        if job["status"] != JobStatus.UPLOADING:
            raise Conflict(f"the upload {run_name!r} is already finished")
        return UploadJob(job["id"], job["job_name"], run.id, run_name, run.tag_on_done)

    def finish_upload_run(self, run_name: str, files: Sequence[FileRecord]) -> None:
        """Records the files, marks the job (and so the run) done and sets the tag, in one transaction."""
        with self.db.tx() as c:
            job = self.upload_job(run_name)  # in the transaction: two commits cannot both finish it
            now = self.db.clock()
            _replace(c, job.id, files)
            if lifecycle.move_job(c, lifecycle.UPLOAD_DONE, job.id, at=now, also="exit_code = 0") is None:
                raise Conflict(f"the upload {run_name!r} is already finished")
            lifecycle.refresh_run_status(c, job.run_id, now)  # done: this also sets the run's tag_on_done
