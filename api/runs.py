"""Runs: submit (`dstack run`'s packing, checks and request), wait, logs, artifacts, stop, list."""

from __future__ import annotations

import builtins
import enum
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dstack.api.code import CodeCache
from dstack.api.errors import PartlySubmitted, RunFailed, WaitTimeout
from dstack.cli.client import SUBMIT_RUNS_MAX, BatchNotStored, SubmitRunsUnsupported
from dstack.cli.client import Client as _Channel
from dstack.cli.errors import CliError, LimitReached, NotFoundError, RequestRejected
from dstack.cli.render import run_status
from dstack.protos.v1 import client_pb2

if TYPE_CHECKING:
    from dstack.cli.commands.run import Request
    from dstack.cli.packing import PackedCode

log = logging.getLogger("dstack.api")

POLL_MIN_S = 0.05
POLL_MAX_S = 1.0
STOP_WAIT_S = 60.0


class RunStatus(enum.StrEnum):
    """A run's state, as `dstack ps` names it."""

    SUBMITTED = "submitted"
    PENDING = "pending"
    PULLING = "pulling"
    RUNNING = "running"
    UPLOADING = "uploading"
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"
    UNKNOWN = "unspecified"

    @property
    def finished(self) -> bool:
        return self in (RunStatus.DONE, RunStatus.FAILED, RunStatus.STOPPED)

    @classmethod
    def of(cls, status: int) -> RunStatus:
        try:
            return cls(run_status(status))
        except ValueError:  # a newer coordinator's state
            return cls.UNKNOWN


@dataclass(frozen=True)
class Artifact:
    job: str
    path: str
    size: int
    sha256: str


class _LogNotes:
    """Where `dstack run` prints notes about the code sent (left-out files, its size), the SDK logs them."""

    def print(self, *parts: str | tuple[str, str]) -> None:
        text = "".join(p if isinstance(p, str) else p[0] for p in parts)
        (log.warning if "warning" in text or "left out" in text else log.info)("%s", text)


class Artifacts:
    """A run's artifacts: what its jobs saved."""

    def __init__(self, run: Run) -> None:
        self._run = run

    def list(self) -> list[Artifact]:
        files = self._run._channel.list_artifacts(self._run.name)
        return [Artifact(f.job_name, f.path, f.size, f.sha256) for f in files]

    def download(self, path: str = "", to: str | os.PathLike[str] = ".") -> builtins.list[Path]:
        """Downloads the artifacts at or under `path` (all by default) into the folder `to`, keeping their
        paths; each is checked by sha256. Returns the files written. NotFoundError if none is at `path`."""
        from dstack.cli.commands.artifacts import download_artifacts

        return download_artifacts(self._run._channel, self._run.name, Path(to), path)


class Run:
    """A submitted run. Its attributes are from the last time it was read (`refresh()` reads it again)."""

    def __init__(self, channel: _Channel, info: client_pb2.Run) -> None:
        self._channel = channel
        self.info = info  # the coordinator's record (protos/v1/client.proto: Run)
        self.artifacts = Artifacts(self)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def workflow(self) -> str:
        return self.info.workflow

    @property
    def status(self) -> RunStatus:
        return RunStatus.of(self.info.status)

    @property
    def message(self) -> str:
        """Why it waits, or why it failed, when the coordinator says."""
        return self.info.message

    def refresh(self) -> Run:
        self.info = self._channel.get_run(self.name)
        return self

    def wait(self, timeout: float | None = None, check: bool = False) -> RunStatus:
        """Waits until the run has finished; returns its final status (done, failed or stopped). With
        `check`, a run that did not end done raises RunFailed. WaitTimeout after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = POLL_MIN_S
        while not self.status.finished:
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(self.name, str(self.status), timeout or 0.0)
            pause = delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic()))
            time.sleep(pause)
            delay = min(delay * 1.5, POLL_MAX_S)
            self.refresh()
        if check:
            self.check()
        return self.status

    def check(self) -> None:
        """Raises RunFailed if the run has finished and is not done."""
        if self.status.finished and self.status != RunStatus.DONE:
            raise RunFailed(self.name, str(self.status), self.message)

    def logs(self, follow: bool = False, job: str | None = None) -> Iterator[str]:
        """The run's log lines (of every job, or of `job`), without their newlines; with `follow`, until the
        run finishes. A broken stream resumes where it stopped: each line comes once."""
        from dstack.cli.commands.logs import log_batches

        for batch in log_batches(self._channel, self.name, follow, blocks=True):
            for part in batch.jobs:
                if job is None or part.job_name == job:
                    yield from part.texts()
            if batch.finished_run is not None:
                self.info = batch.finished_run

    def stop(self, wait: float = STOP_WAIT_S) -> RunStatus:
        """Stops the run, waiting up to `wait` seconds for it to end; returns its status then."""
        from dstack.cli.commands.stop import stop_and_wait

        self.info, _ = stop_and_wait(self._channel, self.name, wait)
        return self.status

    def __repr__(self) -> str:
        return f"Run(name={self.name!r}, workflow={self.workflow!r}, status={self.status.value!r})"


class Runs:
    """`client.runs`: submitting, finding and waiting for runs."""

    def __init__(self, channel: _Channel, code: CodeCache) -> None:
        self._channel = channel
        self._code = code

    def submit(
        self,
        workflow: str,
        args: Sequence[str] = (),
        repo: str | os.PathLike[str] = ".",
        variables: Mapping[str, object] | None = None,
        tag: str = "",
        priority: int = 0,
    ) -> Run:
        """Submits `workflow` of the project at or above `repo`, as `dstack run WORKFLOW ARGS` there does:
        its code (packed once while the tree is unchanged), its dependencies, `variables` overriding those
        of .dstack/variables.yaml, `args` passed on (${{ run.args }}). Errors in the workflow (WorkflowError,
        NotFoundError) come before anything is sent."""
        return self.submit_many(workflow, [args], repo, variables, tag, priority, workers=1)[0]

    def submit_many(
        self,
        workflow: str,
        args: Sequence[Sequence[str]],
        repo: str | os.PathLike[str] = ".",
        variables: Mapping[str, object] | None = None,
        tag: str = "",
        priority: int = 0,
        workers: int = 8,
    ) -> builtins.list[Run]:
        """Submits one run of `workflow` for each item of `args` (its arguments): the code is packed and
        checked once, every request is built before the first is sent, and `workers` submissions are in
        flight at once on the one channel. Returns the runs in the order of `args`.

        When some were not submitted, PartlySubmitted says which were (`error.runs`, in the order of `args`)
        and why each other was not; a run refused alone (a limit) leaves the others submitted, while a batch
        that a coordinator fault undid was stored not at all (sending those again is safe)."""
        from dstack.cli.commands.run import build_request, check_code_files, submit_built
        from dstack.cli.repository import repository_of
        from dstack.cli.workflows import find_project_root

        root = find_project_root(Path(repo).expanduser().resolve())
        notes = _LogNotes()
        built = [build_request(root, workflow, [*_variable_args(variables), *run_args]) for run_args in args]
        # A custom provider's pinned commit travels with the code (cli/providers/custom.py), as in `dstack run`.
        provider_repos = list(dict.fromkeys(r for b in built for r in b.provider_repos))
        packed = self._code.pack(root, provider_repos)
        repository = repository_of(root, packed.ref.repo_url)
        for b in built:
            check_code_files(b, packed, root, notes)
            b.submit.tag_on_done = tag
            b.submit.priority = priority
            b.submit.repository = repository
        if not built:
            return []
        # The first alone: it uploads the code (once), then the rest find it there. Refused, nothing is submitted.
        first = submit_built(self._channel, built[0], packed, notes, self._code.uploaded)
        results: builtins.list[client_pb2.Run | str] = [first]
        if len(built) > 1:
            try:
                results += self._submit_batched(built[1:], packed)
            except SubmitRunsUnsupported:
                results += self._submit_one_by_one(built[1:], packed, notes, workers)
        runs = [Run(self._channel, r) if isinstance(r, client_pb2.Run) else None for r in results]
        if any(r is None for r in runs):
            raise PartlySubmitted(runs, [r if isinstance(r, str) else "" for r in results])
        return [r for r in runs if r is not None]

    def _submit_one_by_one(
        self, built: Sequence[Request], packed: PackedCode, notes: _LogNotes, workers: int
    ) -> builtins.list[client_pb2.Run | str]:
        """To a coordinator without SubmitRuns: one SubmitRun per run, `workers` at once; each run's refusal
        in its place (the others are submitted, as they were sent)."""
        from dstack.cli.commands.run import submit_built

        uploaded = self._code.uploaded

        def one(b: Request) -> client_pb2.Run | str:
            try:
                return submit_built(self._channel, b, packed, notes, uploaded)
            except (RequestRejected, LimitReached, NotFoundError) as e:  # refused: this run only
                return f"refused: {e}"
            except CliError as e:  # the call failed on the way: it may or may not have been stored
                return f"unknown: {e} (`dstack ps` shows whether it was submitted)"

        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="dstack-submit") as pool:
            return list(pool.map(one, built))

    def _submit_batched(self, built: Sequence[Request], packed: PackedCode) -> builtins.list[client_pb2.Run | str]:
        """SubmitRuns, SUBMIT_RUNS_MAX at a time (one call, one transaction on the coordinator, instead of
        one call per run), after the same client-side checks as `dstack run`. Each run, or why it was not
        submitted, in order: a refused run stands alone; a batch undone by a fault, or a failed call, ends
        the sending (the runs after it are not sent)."""
        from dstack.cli.commands.run import check_container_runtime, check_tags, located

        checked: set[tuple[object, ...]] = set()
        for b in built:
            key = (tuple((t, e) for t, e, _ in b.tag_checks), b.submit.repository, bool(b.container_needs))
            if key not in checked:  # the same workflow's runs ask the same questions: once is enough
                check_container_runtime(self._channel, b)
                check_tags(self._channel, b)
                checked.add(key)
            b.submit.code.CopyFrom(packed.ref)
        out: builtins.list[client_pb2.Run | str] = []
        for i in range(0, len(built), SUBMIT_RUNS_MAX):
            chunk = built[i : i + SUBMIT_RUNS_MAX]
            try:
                answers = self._channel.submit_runs([b.submit for b in chunk])
            except BatchNotStored as e:
                failed = f"not stored: {e}"
            except SubmitRunsUnsupported:
                if i == 0:
                    raise
                failed = "not sent: the coordinator no longer accepts SubmitRuns (it was downgraded?)"
            except CliError as e:  # unreachable, timed out: the coordinator may have stored the batch or not
                failed = f"unknown: {e} (`dstack ps` shows whether it was submitted)"
            else:
                for b, got in zip(chunk, answers, strict=True):
                    out.append(f"refused: {located(RequestRejected(got), b)}" if isinstance(got, str) else got)
                continue
            out += [failed] * len(chunk)
            out += ["not sent: an earlier batch failed"] * (len(built) - i - len(chunk))
            break
        return out

    def get(self, name: str) -> Run:
        """The run named `name` (NotFoundError if there is none)."""
        return Run(self._channel, self._channel.get_run(name))

    def list(self, all: bool = False, workflow: str | None = None, status: RunStatus | str | None = None) -> list[Run]:
        """The runs `dstack ps` lists (`all`: `dstack ps -a`, every run the coordinator keeps), newest first;
        only those of `workflow`, or with `status`, if given."""
        wanted = RunStatus(status) if status is not None else None
        return [
            Run(self._channel, r)
            for r in self._channel.list_runs(all)
            if (workflow is None or r.workflow == workflow) and (wanted is None or RunStatus.of(r.status) == wanted)
        ]

    def wait(self, runs: Sequence[Run], timeout: float | None = None, check: bool = False) -> builtins.list[RunStatus]:
        """Waits until every one of `runs` has finished, reading them in one call per round (not one each);
        returns their final statuses in order. `check`: RunFailed for the first that did not end done."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = {r.name: r for r in runs if not r.status.finished}
        delay = POLL_MIN_S
        while pending:
            if deadline is not None and time.monotonic() >= deadline:
                slow = next(iter(pending.values()))
                raise WaitTimeout(slow.name, f"{slow.status} (and {len(pending) - 1} more unfinished)", timeout or 0.0)
            time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))
            delay = min(delay * 1.5, POLL_MAX_S)
            # Unfinished runs and recently finished ones, in one answer; one that is missing is read alone.
            listed = {r.name: r for r in self._channel.list_runs(False)}
            for name in list(pending):
                run = pending[name]
                if name in listed:
                    run.info = listed[name]
                else:
                    run.refresh()
                if run.status.finished:
                    del pending[name]
        if check:
            for r in runs:
                r.check()
        return [r.status for r in runs]


def _variable_args(variables: Mapping[str, object] | None) -> list[str]:
    """`variables` as `dstack run`'s `--NAME=VALUE` overrides (a name that is not a variable of the workflow
    is then a WorkflowError, as on the command line)."""
    if not variables:
        return []
    return [f"--{name}={_text(value)}" for name, value in variables.items()]


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
