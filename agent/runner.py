"""One job on this agent, from assignment to its final report.

Lifecycle (docs/lifecycle.md):
  1. fetch the code (cached by hash) and unpack it into the job's own directory;
  2. create the declared artifact folders;
  3. start the process through the runtime; report RUNNING;
  4. stream stdout/stderr line by line into the outbox;
  5. on exit report UPLOADING, save the artifacts (manifest last);
  6. report DONE, FAILED or STOPPED, only after every log line has been sent;
  7. remove the job's directory.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import shutil
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dstack.agent.address import check_port_free, master_port
from dstack.agent.artifacts import (
    ArtifactError,
    ContainerFolders,
    Downloader,
    UploadCache,
    Uploader,
    make_container_folders,
    plan_container_folders,
    prepare_dirs,
)
from dstack.agent.code import CodeCache
from dstack.agent.diskspace import DiskState, DiskWatch, caused_by_full_disk
from dstack.agent.envcache import applies_to
from dstack.agent.environment import EnvironmentRecorder, cached_host_facts, host_facts
from dstack.agent.jobuser import ENVS
from dstack.agent.masking import Masker
from dstack.agent.outbox import Outbox
from dstack.agent.ports import PortPool
from dstack.agent.provider_jobs import ProvidedJobsError, parse_jobs, read_jobs_file
from dstack.agent.runtimes import AGENT_MARKER, JobProcess, Runtime, RuntimeJob
from dstack.protos.v1 import agent_pb2, common_pb2

log = logging.getLogger("dstack.agent")
JS = common_pb2.JobStatus
TR = common_pb2.TerminationReason
MAX_LINE = 64 * 1024  # longer lines are split, so one line cannot exhaust memory
DRAIN_TIMEOUT_S = 5.0  # without any output read, after the job's main process ended
DRAIN_MAX_S = 600.0  # in all, unless the outbox holds the reading back
FINAL = (JS.JOB_STATUS_DONE, JS.JOB_STATUS_FAILED, JS.JOB_STATUS_STOPPED)


@dataclass
class RunnerDeps:
    jobs_dir: Path
    runtime: Runtime
    code: CodeCache
    outbox: Outbox
    uploader: Uploader
    downloader: Downloader
    gpu_uuids: Callable[[list[int]], list[str]]
    gpus_simulated: bool
    janitor: Janitor
    mount_sync_s: float
    agent_home: str
    ports: PortPool = field(default_factory=PortPool)  # `ports: N`: the agent's picks, held per job
    hostname: str = field(default_factory=socket.gethostname)  # JOB_HOSTNAME: where the job's ports are
    # The job's GPUs from the inventory, and the (driver, CUDA) versions: for the run's record.
    gpu_infos: Callable[[list[int]], list[common_pb2.GpuInfo]] = field(default=lambda _indices: [])
    gpu_versions: Callable[[], tuple[str, str]] = field(default=lambda: ("", ""))
    # The work folders' free space (agent/diskspace.py); `disk_full` tells the agent's session a job met a
    # full disk (the coordinator hears it at once); `agent_name` says where, in the job's reason.
    disk: DiskWatch | None = None
    disk_full: Callable[[], None] = field(default=lambda: None)
    agent_name: str = ""


class Janitor:
    """Removes finished jobs' directories in batches, off the path of the next job."""

    def __init__(self) -> None:
        self._dirs: list[Path] = []
        self._task: asyncio.Task[None] | None = None

    def remove(self, path: Path) -> None:
        self._dirs.append(path)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        await asyncio.sleep(0.2)  # let a burst of finishing jobs share one trip to the worker thread
        while self._dirs:
            batch, self._dirs = self._dirs, []
            await asyncio.to_thread(_remove_all, batch)


# Where an agent's start moves its predecessor's job folders to be removed (set_aside_job_folders).
SET_ASIDE_PREFIX = ".leftovers-"


def set_aside_job_folders(jobs_dir: Path) -> list[Path]:
    """A previous agent's job folders, moved aside at this agent's start, for the Janitor to remove off the
    start path; with what an earlier start set aside and did not get to remove (it was killed too).

    Its jobs were killed just before (Runtime.cleanup_leftovers) and none is adopted: the coordinator
    fails them, and the Janitor of the agent that ran them died with it. Moved, not removed here: a job
    folder may be large, and a job resent to this agent (assigned, never started) reuses its name.
    The job user's environment cache (ENVS) stays."""
    try:
        entries = [e for e in os.scandir(jobs_dir) if e.name != ENVS]
    except FileNotFoundError:
        return []
    aside = [Path(e.path) for e in entries if e.name.startswith(SET_ASIDE_PREFIX)]
    left = [e for e in entries if not e.name.startswith(SET_ASIDE_PREFIX)]
    if left:
        into = jobs_dir / (SET_ASIDE_PREFIX + secrets.token_hex(6))
        into.mkdir(mode=0o700)
        for e in left:
            try:
                os.rename(e.path, into / e.name)  # within one folder: a rename of a name, whatever it holds
            except OSError as err:  # never the agent's start: the folder stays where it is
                log.warning("cannot remove %s, a job folder of a previous agent run: %s", e.path, err)
        aside.append(into)
    return aside


def _remove_all(dirs: list[Path]) -> None:
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


class LineSplitter:
    """Splits a stream's chunks into lines (without their newline, or a CR before it). `emit_text` gets
    the complete lines of a chunk joined by "\n" (the agent's path: one call, one decode, no object per
    line), `emit_many` them as a list, `emit` each line."""

    def __init__(
        self,
        emit: Callable[[str], None] | None = None,
        emit_many: Callable[[list[str]], None] | None = None,
        emit_text: Callable[[str], None] | None = None,
    ) -> None:
        self.emit = emit or _drop
        self.emit_many = emit_many or self._each
        self.emit_text = emit_text or self._split
        self.buf = b""

    def _split(self, text: str) -> None:
        self.emit_many(text.split("\n"))

    def _each(self, lines: list[str]) -> None:
        for line in lines:
            self.emit(line)

    def feed(self, chunk: bytes) -> None:
        buf = self.buf + chunk if self.buf else chunk
        end = buf.rfind(b"\n")
        if end < 0:
            self.buf = buf
        else:
            self.buf = buf[end + 1 :]
            # Decoded as one block: a newline is never part of a UTF-8 sequence, so this is each line's
            # own decoding (a broken sequence at a line's end is replaced all the same).
            text = buf[:end].decode("utf-8", errors="replace")
            if "\r" in text:  # a CR before each newline goes, and before the chunk's last (cut off above)
                text = text.replace("\r\n", "\n")
                if text.endswith("\r"):
                    text = text[:-1]
            self.emit_text(text)
        while len(self.buf) > MAX_LINE:
            self._emit(self.buf[:MAX_LINE])
            self.buf = self.buf[MAX_LINE:]

    def _emit(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        self.emit_text(line.decode("utf-8", errors="replace"))

    def close(self) -> None:
        if self.buf:
            self._emit(self.buf)
            self.buf = b""


def _drop(_line: str) -> None:
    pass


@functools.cache
def base_env() -> dict[str, str]:
    """What every job's environment starts from (computed once; callers copy it)."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "USER", "LOGNAME", "TZ")}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["LANG"] = "C.UTF-8"
    env["PYTHONUNBUFFERED"] = "1"  # logs of Python jobs arrive as they are printed
    return env


def job_env(hostname: str, ports: list[int]) -> dict[str, str]:
    """What the 2022 runner told every job: where it runs (JOB_HOSTNAME, HOSTNAME: the agent's host,
    where its ports are reached) and the ports picked for `ports: N`, as PORT_i and JOB_PORT_i."""
    env = {"JOB_HOSTNAME": hostname, "HOSTNAME": hostname}
    for i, port in enumerate(ports):
        env[f"PORT_{i}"] = env[f"JOB_PORT_{i}"] = str(port)
    return env


# Set by the coordinator on the master of a 2022 provider program's gang (coordinator/provided_jobs.py).
MASTER_SERVES_JOB_PORT_0 = "DSTACK_MASTER_SERVES_JOB_PORT_0"


def master_job_env(env: dict[str, str]) -> dict[str, str]:
    """A 2022 master job listened on its own JOB_HOSTNAME and JOB_PORT_0, where its workers were told
    MASTER_JOB_HOSTNAME and MASTER_JOB_PORT_0: here those are the gang's MASTER_ADDR and MASTER_PORT."""
    addr, port = env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")
    if not addr or not port:
        return {}
    return {"JOB_HOSTNAME": addr, "JOB_PORT_0": port, "PORT_0": port}


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class JobRunner:
    def __init__(self, deps: RunnerDeps, assignment: agent_pb2.JobAssignment, after: Sequence[JobRunner] = ()) -> None:
        self.deps = deps
        self.a = assignment
        self.after = list(after)  # jobs of this agent holding GPUs this one gets: they end first
        self.job_id = assignment.job_id
        self.proc: JobProcess | None = None
        self.published_ports: list[tuple[int, int]] = []  # (host, container), once started
        self.stop_requested = False
        self.abort = False
        # Why the agent stopped the job itself (agent/lease.py: its lease ran out); "" if it did not.
        self.fenced = ""
        self.upload_cache: UploadCache = {}  # files already saved (mounted artifacts), by size and mtime
        self.folders: ContainerFolders = {}  # absolute artifact paths -> the job's host folders mounted there
        self.task: asyncio.Task[None] | None = None
        self._pumped = 0  # bytes of output read so far
        self.record = EnvironmentRecorder(deps.runtime.name)

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self._run(), name=f"job-{self.job_id}")
        return self.task

    def _update(
        self,
        status: common_pb2.JobStatus.ValueType,
        reason: common_pb2.TerminationReason.ValueType = TR.TERMINATION_REASON_UNSPECIFIED,
        message: str = "",
        exit_code: int | None = None,
        ports: list[tuple[int, int]] | None = None,
        provided: list[common_pb2.JobSpec] | None = None,
    ) -> None:
        u = agent_pb2.JobUpdate(job_id=self.job_id, status=status, termination_reason=reason, message=message)
        u.provided_jobs.extend(provided or [])
        for host, container in ports or []:
            u.ports.add(host_port=host, container_port=container)
        if exit_code is not None:
            u.exit_code, u.has_exit_code = exit_code, True
        if status in FINAL:  # what ran, for the run's record (agent/environment.py)
            u.environment.CopyFrom(self.record.env)
        self.deps.outbox.add_update(u)

    def _system_line(self, text: str) -> None:
        self.deps.outbox.add_line(self.job_id, common_pb2.LOG_STREAM_SYSTEM, text)

    async def fence(self, message: str) -> None:
        """Self-fencing: the job is killed now (its process group, its container), and reported failed
        with `agent lost`: the coordinator requeues it where its `retry` says so, or has already (then the
        report is refused, and confirms the stale attempt dead, coordinator/fencing.py)."""
        self.fenced = message
        self._system_line(f"dstack: {message}")
        await self.stop(abort=True)

    def _stopped(self, code: int | None = None) -> None:
        if self.fenced:
            self._update(JS.JOB_STATUS_FAILED, TR.TERMINATION_REASON_AGENT_LOST, self.fenced, code)
        else:
            self._update(JS.JOB_STATUS_STOPPED, TR.TERMINATION_REASON_STOPPED_BY_USER, "stopped by user", code)

    async def stop(self, abort: bool) -> None:
        self.stop_requested = True
        self.abort = self.abort or abort
        if self.proc is not None:
            await self.proc.stop(abort)

    async def _wait_for_gpus(self) -> None:
        """Waits until the jobs holding this job's GPUs have ended (or this one is stopped)."""
        tasks = {r.task for r in self.after if r.task is not None and not r.task.done()}
        if not tasks:
            return
        held = sorted(set(self.a.gpu_indices) & {g for r in self.after for g in r.a.gpu_indices})
        names = ", ".join(sorted(r.job_id for r in self.after))
        log.warning("job %s waits for GPU(s) %s, still held by %s", self.job_id, held, names)
        self._system_line(f"dstack: waiting for GPU(s) {', '.join(map(str, held))} to be freed by {names}")
        while tasks and not self.stop_requested:
            _, tasks = await asyncio.wait(tasks, timeout=0.5)
        self.after = []

    async def _run(self) -> None:
        workdir = self.deps.jobs_dir / self.job_id
        # The host folders of its absolute artifact paths: the job's own, next to its code folder (which is
        # mounted whole at /workflow, so they cannot be inside it), removed with it.
        container_dirs = self.deps.jobs_dir / f"{self.job_id}.mounts"
        spec = self.a.spec
        try:
            await self._wait_for_gpus()
            if self.stop_requested:
                self._stopped()
                return
            if self.deps.disk is not None and self.deps.disk.state.full:
                # Placed before the coordinator heard the disk is full: it goes elsewhere, nothing written here.
                self._disk_full_end(self.deps.disk.state, "")
                return
            try:
                # Checked before anything is written: a path the agent refuses touches nothing on the host.
                self.folders = folders = plan_container_folders(container_dirs, spec.artifacts, self.a.inputs)
                if folders and self.deps.runtime.name != "docker":
                    raise ArtifactError(
                        f"absolute artifact path {next(iter(folders))} is a folder inside the job's container, and"
                        f" this agent's runtime is {self.deps.runtime.name} (no containers)"
                    )

                # The runtime's own work on the job's folder (its user, its cgroups) rides along on the same
                # worker-thread trip, unless inputs are still to come into the folder after it.
                runtime_prep = (
                    None
                    if self.a.inputs
                    else await self.deps.runtime.preparation(
                        self.job_id, workdir, spec.resources.memory_bytes, spec.resources.cpu
                    )
                )

                def prepare() -> None:
                    prepare_dirs(workdir, spec.artifacts, spec.working_dir)
                    make_container_folders(folders)
                    if runtime_prep is not None:
                        runtime_prep()

                await self._record_machine(spec)
                with self.record.phase("code"):
                    await self.deps.code.materialize(self.a.code, workdir, prepare)
                if self.a.inputs:  # the artifacts of its dependencies, at the same paths
                    with self.record.phase("inputs"):
                        n = await self.deps.downloader.fetch(self.a.inputs, workdir, folders, spec.working_dir)
                    sources = ", ".join(f"{i.run_name}/{i.job_name}" for i in self.a.inputs)
                    self._system_line(f"dstack: {n} artifact file(s) from {sources}")
                if self.stop_requested:
                    self._stopped()
                    return
                # Held until the job ends (the finally below), so no other job of this agent gets them.
                picked = self.deps.ports.reserve(self.job_id, spec.port_count, [p.host_port for p in spec.ports])
                if picked:
                    names = f"$PORT_0..$PORT_{len(picked) - 1}" if len(picked) > 1 else "$PORT_0"
                    self._system_line(f"dstack: ports {', '.join(map(str, picked))} as {names}")
                where = job_env(self.deps.hostname, picked)
                env = self.deps.runtime.base_env(base_env()) | dict(self.a.secrets) | dict(self.a.env)
                # The workflow may name its own HOSTNAME; the picked ports are what the job got, always.
                env |= {k: v for k, v in where.items() if not k.startswith(("PORT_", "JOB_PORT_"))}
                env |= dict(spec.env)
                env |= {k: v for k, v in where.items() if k.startswith(("PORT_", "JOB_PORT_"))}
                env[AGENT_MARKER] = self.deps.agent_home
                ports = [(p.host_port, p.container_port) for p in spec.ports] + [(p, p) for p in picked]
                master = master_port(spec.gang, spec.node_rank, dict(self.a.env))
                if master is not None:  # a multi-node gang's rank 0: its peers meet here (docs/multinode.md)
                    if env.get(MASTER_SERVES_JOB_PORT_0) == "1":
                        env |= master_job_env(env)
                    check_port_free(master)
                    ports.append((master, master))  # published, for a container on a bridge network
                starting = time.monotonic_ns()
                pulling_since: list[int] = []

                def on_pulling() -> None:
                    pulling_since.append(time.monotonic_ns())
                    self._update(JS.JOB_STATUS_PULLING)

                self.proc = await self.deps.runtime.start(
                    RuntimeJob(
                        job_id=self.job_id,
                        workdir=workdir,
                        working_dir=spec.working_dir or ".",
                        loopback_ports=frozenset(p.container_port for p in spec.ports if p.app),
                        commands=list(spec.commands),
                        env=env,
                        gpu_indices=list(self.a.gpu_indices),
                        gpu_uuids=self.deps.gpu_uuids(list(self.a.gpu_indices)),
                        image=spec.image,
                        cpu=spec.resources.cpu,
                        memory_bytes=spec.resources.memory_bytes,
                        shm_size_bytes=spec.resources.shm_size_bytes,
                        provider=spec.provider,
                        python_version=spec.python_version,
                        ports=ports,
                        mounts=[(str(host), path) for path, host in folders.items()],
                        provider_program=spec.provider_program,
                        gpus_simulated=self.deps.gpus_simulated,
                        system_line=self._system_line,
                        on_pulling=on_pulling,
                    )
                )
                started = time.monotonic_ns()
                pulled = started - pulling_since[0] if pulling_since else 0
                self.record.add_time("pulling", pulled)
                self.record.add_time("setup", started - starting - pulled)
                self.record.set_runtime_facts(self.proc.facts())
            except Exception as e:
                if caused_by_full_disk(e):
                    self._disk_full_end(await self._measure_disk(), f" preparing the job: {e}")
                    return
                log.warning("job %s could not start: %s", self.job_id, e)
                self._system_line(f"dstack: the job could not start: {e}")
                self._update(JS.JOB_STATUS_FAILED, TR.TERMINATION_REASON_EXECUTOR_ERROR, str(e))
                return
            # The ports as published on the agent's host: what the coordinator records and shows, and what
            # a tunnel may reach (agent/tunnels.py): the list form and the `ports: N` picks alike.
            self.published_ports = self.deps.runtime.published_ports(ports)
            self._update(JS.JOB_STATUS_RUNNING, ports=self.published_ports)
            if self.stop_requested:  # a stop that arrived while the process was starting
                await self.proc.stop(self.abort)
            pump = asyncio.create_task(self._pump_output(self.proc))
            mounts = [a for a in spec.artifacts if a.mount]
            syncer = asyncio.create_task(self._sync_mounts(workdir, mounts)) if mounts else None
            try:
                # The job ends when its main process does; the runtime then kills what is left of it.
                with self.record.phase("running"):
                    code = await self.proc.wait()
                await self._drain(pump)
                if applies_to(spec.provider):  # only their environment writes a report (env_helper.py)
                    await asyncio.to_thread(self.record.read_report, workdir)
            finally:
                pump.cancel()
                if syncer is not None:
                    syncer.cancel()
                    await asyncio.gather(syncer, return_exceptions=True)
            await self.proc.cleanup()  # when wait() did not return, the handler below stops first, then cleans
            try:
                if self.proc.lost and not self.stop_requested:
                    self._system_line(f"dstack: {self.proc.lost}")
                    self._update(JS.JOB_STATUS_FAILED, TR.TERMINATION_REASON_EXECUTOR_ERROR, self.proc.lost, code)
                    return
                await self._finish(code, workdir, spec)
            except Exception as e:  # a job must never be left without a final state
                log.exception("job %s: finishing failed", self.job_id)
                self._update(JS.JOB_STATUS_FAILED, TR.TERMINATION_REASON_EXECUTOR_ERROR, f"agent error: {e}", code)
        except BaseException:  # cancelled (the agent is stopping) or broken: nothing of the job may survive
            if self.proc is not None:
                await self.proc.stop(abort=True)
                await self.proc.cleanup()
            raise
        finally:
            self.deps.runtime.forget(self.job_id)
            self.deps.ports.release(self.job_id)
            self.deps.outbox.mark_finished(self.job_id)
            self.deps.janitor.remove(workdir)
            if self.folders:
                self.deps.janitor.remove(container_dirs)
            # The job's secrets live only as long as the job: whoever still holds the assignment (a
            # message being handled, a reference in a traceback) holds them no more.
            self.a.secrets.clear()
            self.proc = None

    async def _sync_mounts(self, workdir: Path, mounts: list[common_pb2.ArtifactSpec]) -> None:
        """`mount: true` folders are saved while the job runs (changed files only), not only at the end."""
        while True:
            await asyncio.sleep(self.deps.mount_sync_s)
            try:
                await self.deps.uploader.upload(
                    self.job_id, workdir, mounts, self.upload_cache, self.folders, self.a.spec.working_dir
                )
            except (ArtifactError, OSError) as e:
                log.warning("job %s: syncing mounted artifacts failed (will retry): %s", self.job_id, e)

    async def _drain(self, pump: asyncio.Task[None]) -> None:
        """Waits for the output the job wrote before it ended; a process that escaped the job's
        process group (setsid) may hold the pipes open, so the wait is bounded: it ends once no output
        was read for DRAIN_TIMEOUT_S (or after DRAIN_MAX_S in all), unless the outbox is what holds the
        reading back (the coordinator is away or slow: that is no reason to drop the job's last lines)."""
        started = time.monotonic()
        read = self._pumped
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(pump), DRAIN_TIMEOUT_S)
                return
            except TimeoutError:
                # Megabytes still queued from a job that printed fast take this agent a while to split.
                progressed, read = self._pumped != read, self._pumped
                if self.deps.outbox.throttled(self.job_id):
                    continue
                if progressed and time.monotonic() - started < DRAIN_MAX_S:
                    continue
                self._system_line(
                    "dstack: output written after the job ended is not shown (a detached process kept it open)"
                )
                return

    async def _pump_output(self, proc: JobProcess) -> None:
        outbox, job_id = self.deps.outbox, self.job_id
        mask = Masker(self.a.secrets.values()).mask_lines if self.a.secrets else None  # line by line, as before

        def emitter(kind: common_pb2.LogStream.ValueType) -> Callable[[str], None]:
            if mask is None:
                return lambda text: outbox.add_text(job_id, kind, text)
            return lambda text: outbox.add_text(job_id, kind, mask(text))

        splitters = {
            int(kind): LineSplitter(emit_text=emitter(kind))
            for kind in (common_pb2.LOG_STREAM_STDOUT, common_pb2.LOG_STREAM_STDERR)
        }
        async for kind, chunk in proc.output():
            splitters[kind].feed(chunk)
            self._pumped += len(chunk)
            # Back-pressure: while the coordinator has not taken enough of this job's lines, its output is
            # not read (its pipe fills, its writes block). Also a yield, so a job that prints without pause
            # cannot keep the heartbeat (the same event loop) waiting.
            await outbox.room(job_id)
            await asyncio.sleep(0)
        for s in splitters.values():
            s.close()

    async def _finish(self, code: int, workdir: Path, spec: common_pb2.JobSpec) -> None:
        if self.stop_requested:
            if spec.artifacts and not self.abort:
                self._update(JS.JOB_STATUS_UPLOADING, exit_code=code)
                await self._save_artifacts(workdir, spec)
            self._stopped(code)
            return
        if spec.artifacts:
            self._update(JS.JOB_STATUS_UPLOADING, exit_code=code)
            error = await self._save_artifacts(workdir, spec)
            if error is not None and code == 0:
                self._update(JS.JOB_STATUS_FAILED, TR.TERMINATION_REASON_ARTIFACT_UPLOAD_FAILED, error, code)
                return
        provided: list[common_pb2.JobSpec] = []
        if code == 0 and spec.provider_program:  # a 2022 provider program: the jobs it wrote join the run
            try:
                provided = await asyncio.to_thread(self._provided_jobs, workdir, spec)
            except ProvidedJobsError as e:
                self._system_line(f"dstack: the provider's jobs are refused: {e}")
                self._update(JS.JOB_STATUS_FAILED, TR.TERMINATION_REASON_EXECUTOR_ERROR, str(e), code)
                return
        if code == 0:
            self._update(JS.JOB_STATUS_DONE, TR.TERMINATION_REASON_DONE, "", code, provided=provided)
        else:
            note = self.proc.exit_note if self.proc is not None else ""
            message = describe_exit(code) + (f" ({note})" if note else "")
            disk = await self._measure_disk()
            if disk.full:  # most likely its writes failed: a full disk is no fault of its code
                self._disk_full_end(disk, f"; the job {message}", code)
                return
            self._update(JS.JOB_STATUS_FAILED, TR.TERMINATION_REASON_EXIT_CODE, message, code)

    async def _measure_disk(self) -> DiskState:
        """The work folders' free space now (before this job's folder is removed)."""
        if self.deps.disk is None:
            return DiskState(str(self.deps.jobs_dir), 0, 0, 0, False)
        return await asyncio.to_thread(self.deps.disk.measure)

    def _disk_full_end(self, disk: DiskState, detail: str, code: int | None = None) -> None:
        """Ends the attempt for this agent's full disk: not the job's fault, so the coordinator requeues it
        on another agent (within a bound), and this agent takes no new job until space is back."""
        message = disk.describe(self.deps.agent_name or self.deps.hostname) + detail
        log.warning("job %s: %s", self.job_id, message)
        self._system_line(f"dstack: {message}")
        self.deps.disk_full()
        self._update(JS.JOB_STATUS_FAILED, TR.TERMINATION_REASON_DISK_FULL, message, code)

    @staticmethod
    def _provided_jobs(workdir: Path, spec: common_pb2.JobSpec) -> list[common_pb2.JobSpec]:
        data = read_jobs_file(workdir)
        return [] if data is None else parse_jobs(data, spec)

    async def _record_machine(self, spec: common_pb2.JobSpec) -> None:
        """The GPUs, driver, and (host runtime) OS and Python of the job, for the run's record."""
        indices = list(self.a.gpu_indices)
        versions = await asyncio.to_thread(self.deps.gpu_versions) if indices else ("", "")
        self.record.set_gpus(self.deps.gpu_infos(indices), versions)
        if self.deps.runtime.name == "host":
            python = f"python{spec.python_version}" if spec.python_version else "python3"
            python = python if spec.provider == "python" else ""
            facts = cached_host_facts(python)
            if facts is None:
                facts = await asyncio.to_thread(host_facts, python)
            self.record.env.os = facts.get("os", "")
            self.record.env.python_version = facts.get("python_version", "")

    async def _save_artifacts(self, workdir: Path, spec: common_pb2.JobSpec) -> str | None:
        started = time.monotonic_ns()
        try:
            return await self._upload_artifacts(workdir, spec)
        finally:
            self.record.add_time("uploading", time.monotonic_ns() - started)

    async def _upload_artifacts(self, workdir: Path, spec: common_pb2.JobSpec) -> str | None:
        try:
            n = await self.deps.uploader.upload(
                self.job_id, workdir, spec.artifacts, self.upload_cache, self.folders, spec.working_dir
            )
            log.info("job %s: %d artifact file(s) saved", self.job_id, n)
            return None
        except (ArtifactError, OSError) as e:
            msg = f"artifact upload failed: {e}"
            self._system_line(f"dstack: {msg}")
            return msg
