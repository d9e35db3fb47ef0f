"""Host-process runtime: the job runs as a process tree in its own session on this host."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

from dstack.agent import jobuser
from dstack.agent.envcache import EnvCache, applies_to
from dstack.agent.jobuser import JOB_HOME, JobUser, give
from dstack.agent.provider_jobs import COMPAT_DIR, provider_env
from dstack.agent.runtimes.base import (
    AGENT_MARKER,
    REPORT_FILE,
    REPORT_VAR,
    JobProcess,
    Runtime,
    RuntimeError_,
    RuntimeJob,
    gpu_env,
    working_subdir,
)
from dstack.agent.runtimes.cgroups import (
    DEFAULT_PIDS_LIMIT,
    CgroupLayout,
    JobCgroup,
    host_pids_budget,
    pids_limit_line,
    warn_once,
)
from dstack.agent.spawner import Spawned, Spawner, SpawnerGone, SpawnError
from dstack.protos.v1 import common_pb2

READ_CHUNK = 1 << 16
OUTPUT_QUEUE = 64  # chunks read ahead of the job's output consumer (HostProcess.output)
log = logging.getLogger("dstack.agent")


def _script(job: RuntimeJob) -> str:
    # `set -e`: a failing command fails the job, as a user of a CI system expects.
    return "set -e\n" + "\n".join(job.commands) + "\n"


class SpawnedShell:
    """A job's shell started by the job user's spawner (agent/spawner.py): what HostProcess uses of a Popen.
    Its exit status comes from the spawner, which reaps it only when asked, so its pid stays its own
    (for killpg) until then."""

    def __init__(self, spawner: Spawner, spawned: Spawned, stdout: int, stderr: int) -> None:
        self.spawner = spawner
        self.spawned = spawned
        self.pid = spawned.pid
        self.pidfd: int | None = spawned.pidfd  # HostProcess's to watch and close
        self.stdout: IO[bytes] = open(stdout, "rb", buffering=0)  # HostProcess closes it
        self.stderr: IO[bytes] = open(stderr, "rb", buffering=0)
        self.returncode: int | None = None
        self.lost = False

    def poll(self) -> int | None:
        return self.returncode

    async def reap(self) -> int:
        code = await self.spawner.reap(self.spawned)
        if code is None:  # its spawner died and another process reaped it
            self.lost, code = True, -signal.SIGKILL
        self.returncode = code
        return code


LOST_STATUS = "its exit status was lost: the job user's spawner exited while the job ran"


class HostProcess(JobProcess):
    """The job's main process, started by subprocess.Popen (vfork) rather than asyncio's subprocess
    transport: its two output pipes are read with add_reader and its exit is seen through one pidfd.
    asyncio's transport costs a protocol per pipe, a connecting task, a child watcher's own pidfd and a
    dozen callbacks per job: about 0.15-0.2 ms of the agent's CPU per job, a tenth of it (bench.e2e)."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes] | SpawnedShell,
        grace_s: float,
        cgroup: JobCgroup | None = None,
        system_line: Callable[[str], None] = lambda _text: None,
        remove_cgroup: Callable[[JobCgroup], None] | None = None,
    ) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.grace_s = grace_s
        self.cgroup = cgroup
        self.system_line = system_line
        self.remove_cgroup = remove_cgroup  # None: removed here, at cleanup
        self._loop = asyncio.get_running_loop()
        # The parent's ends of stdout and stderr (read with os.read, non-blocking), until read to their end
        # or closed: by stream, the file object Popen made of it (closing it closes the pipe).
        self._files: dict[int, IO[bytes]] = {}
        self._pipes: dict[int, int] = {}
        for kind, f in ((common_pb2.LOG_STREAM_STDOUT, popen.stdout), (common_pb2.LOG_STREAM_STDERR, popen.stderr)):
            if f is not None:
                os.set_blocking(f.fileno(), False)
                self._files[int(kind)], self._pipes[int(kind)] = f, f.fileno()
        # Done once the main process has exited (not yet reaped: its pid is still its own until wait()).
        self._exited: asyncio.Future[None] = self._loop.create_future()
        self._watch_exit()

    @property
    def returncode(self) -> int | None:
        """Set once wait() has reaped the main process."""
        return self.popen.returncode

    def _watch_exit(self) -> None:
        if isinstance(self.popen, SpawnedShell):
            pidfd, self.popen.pidfd = self.popen.pidfd, None
            assert pidfd is not None
            fd = pidfd
        else:
            try:
                fd = os.pidfd_open(self.pid)
            except (AttributeError, OSError):  # no pidfd on this kernel: poll
                self._poll_task = asyncio.create_task(self._poll_exit())
                return

        def on_exit() -> None:
            self._loop.remove_reader(fd)
            os.close(fd)
            if not self._exited.done():
                self._exited.set_result(None)

        self._loop.add_reader(fd, on_exit)

    async def _poll_exit(self) -> None:
        while self.popen.poll() is None:  # noqa: ASYNC110 - no pidfd: nothing to wait on but polling
            await asyncio.sleep(0.05)
        if not self._exited.done():
            self._exited.set_result(None)

    async def output(self) -> AsyncIterator[tuple[int, bytes]]:
        # Read as the pipes become readable, at most 64 chunks ahead of the consumer: a reader is paused
        # while the queue is full (the runner waits for the outbox's room), so the job's pipe fills and its
        # writes block, as asyncio's transport paused reading.
        q: collections.deque[tuple[int, bytes] | None] = collections.deque()
        ready = asyncio.Event()
        paused: set[int] = set()
        loop = self._loop

        def reader(kind: int, fd: int) -> Callable[[], None]:
            def on_readable() -> None:
                try:
                    chunk = os.read(fd, READ_CHUNK)
                except BlockingIOError:
                    return
                except OSError:
                    chunk = b""
                if not chunk:  # its end: every process holding it closed it
                    loop.remove_reader(fd)
                    self._close_pipe(kind)
                    q.append(None)
                else:
                    q.append((kind, chunk))
                    if len(q) >= OUTPUT_QUEUE:
                        loop.remove_reader(fd)
                        paused.add(kind)
                ready.set()

            return on_readable

        readers = {kind: reader(kind, fd) for kind, fd in self._pipes.items()}
        open_streams = len(readers)
        for kind, fd in self._pipes.items():
            loop.add_reader(fd, readers[kind])
        try:
            while open_streams:
                if not q:
                    ready.clear()
                    await ready.wait()
                    continue
                item = q.popleft()
                if paused and len(q) < OUTPUT_QUEUE:
                    for kind in paused:
                        if kind in self._pipes:  # not closed meanwhile (cleanup)
                            loop.add_reader(self._pipes[kind], readers[kind])
                    paused.clear()
                if item is None:
                    open_streams -= 1
                else:
                    yield item
        finally:
            for kind in list(self._pipes):
                loop.remove_reader(self._pipes[kind])
                self._close_pipe(kind)

    def _close_pipe(self, kind: int) -> None:
        self._pipes.pop(kind, None)
        f = self._files.pop(kind, None)
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()

    async def wait(self) -> int:
        await asyncio.shield(self._exited)
        # What the job left running in its process group (`cmd &`, daemons) dies with it, as in
        # Slurm: otherwise it would hold the job's GPUs and output pipes with no job to show for it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.cgroup is not None:  # and what left the group (setsid) but not the job's cgroup
            closed = self.cgroup.close_at_once()  # an empty group: no worker-thread trip
            oom, hits = closed if closed is not None else await asyncio.to_thread(self.cgroup.close)
            if oom:
                limit = self.cgroup.memory_bytes
                self.exit_note = f"out of memory: the limit is {limit / (1 << 20):.0f} MiB"
            if hits:
                limit = self.cgroup.pids_limit
                self.system_line(pids_limit_line(limit, hits))
                self.exit_note = self.exit_note or f"it hit its pids limit ({limit})"
        # The main process has exited: reaping it does not wait (and its pipes, which a process that left
        # the group may hold open, are the output's business, bounded by the runner's drain).
        if isinstance(self.popen, SpawnedShell):
            status = await self.popen.reap()
            if self.popen.lost:
                self.lost = LOST_STATUS
            return status
        while (code := self.popen.poll()) is None:  # noqa: ASYNC110 - not reapable yet only on a racing kernel
            await asyncio.sleep(0.01)
        return code

    def _tree(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def _signal(self, sig: int, tree: list[psutil.Process]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)  # the job's session leader is its process group leader
        for p in tree:  # and descendants that left the group (setsid, double fork)
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)

    async def stop(self, abort: bool) -> None:
        if self.popen.returncode is not None:
            return  # wait() reaped it: the group, if given back to the pool, is no longer this job's
        if self.cgroup is not None:
            # Before any await: the job may end during the grace period, and its wait() and cleanup give
            # the group back while the kill_all below has yet to seal it (CgroupLayout.give_back).
            self.cgroup.stopping = True
        tree = await asyncio.to_thread(self._tree)
        if not abort:
            self._signal(signal.SIGTERM, tree)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._exited), self.grace_s)
        tree += await asyncio.to_thread(self._tree)
        self._signal(signal.SIGKILL, tree)
        if self.cgroup is not None:
            await asyncio.to_thread(self.cgroup.kill_all)

    async def cleanup(self) -> None:
        for kind in list(self._pipes):  # output() never read them to their end (or never ran)
            self._loop.remove_reader(self._pipes[kind])
            self._close_pipe(kind)
        # Reaped here if wait() never ran (the agent stopping: stop, then cleanup); one still exiting is
        # reaped by subprocess's own bookkeeping at the next start (Popen's _active list), or by its spawner.
        if self.popen.poll() is None and isinstance(self.popen, SpawnedShell):
            self.popen.spawner.forget(self.popen.spawned)
        cgroup, self.cgroup = self.cgroup, None
        if cgroup is None:
            return
        if self.remove_cgroup is not None:
            self.remove_cgroup(cgroup)  # its processes are dead: the rmdir is off the job's path
        else:
            await asyncio.to_thread(cgroup.remove)


def _close_pipe(pipe: tuple[int, ...] | None) -> None:
    for fd in pipe or ():
        with contextlib.suppress(OSError):
            os.close(fd)


def _hand_over_env(fd: int, cgroup: JobCgroup | None, pid: int, payload: bytes) -> bytes:
    """Moves the job user's shell into its cgroups, then writes it its environment and closes the pipe.

    On the event loop's thread: a cgroup.procs write is kernel memory (no disk), and the write to the
    pipe does not wait (non-blocking), so most jobs' environments (up to the pipe's 64 KiB) cost no
    worker-thread trip. Returns what the full pipe did not take (the pipe is then still open, blocking
    again): the caller writes it with _write_rest on a worker thread, as the shell reads."""
    try:
        if cgroup is not None:
            cgroup.join(pid)
        os.set_blocking(fd, False)
        try:
            written = os.write(fd, payload)
        except BlockingIOError:
            written = 0
        if written < len(payload):
            os.set_blocking(fd, True)
            return payload[written:]
    except (BrokenPipeError, ConnectionResetError):
        pass  # it died first: its exit code and stderr say why
    os.close(fd)
    return b""


def _write_rest(fd: int, rest: bytes) -> None:
    """The rest of the environment, blocking (the shell reads it at once: it has done nothing else yet)."""
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(rest)
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        os.close(fd)


@dataclass
class _Prepared:
    cgroup: JobCgroup | None
    missing: list[str] = field(default_factory=list)  # controllers whose limit could not be written
    done: bool = False  # the trip ran to its end


class GroupRemover:
    """Removes finished jobs' cgroups in batches, after their final update: an rmdir waits while the
    kernel lets the last killed processes go, and no job needs the group of one that ended."""

    def __init__(self) -> None:
        self._groups: list[JobCgroup] = []
        self._task: asyncio.Task[None] | None = None

    def remove(self, cgroup: JobCgroup) -> None:
        self._groups.append(cgroup)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        await asyncio.sleep(0.05)  # a burst of finishing jobs shares one trip to the worker thread
        while self._groups:
            batch, self._groups = self._groups, []
            await asyncio.to_thread(_remove_groups, batch)

    async def drain(self) -> None:
        """Returns once every group handed over is removed (the agent stops)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
        if self._groups:
            batch, self._groups = self._groups, []
            await asyncio.to_thread(_remove_groups, batch)


def _remove_groups(groups: list[JobCgroup]) -> None:
    for g in groups:
        if g.pids():  # a pooled group found with a process in it (CgroupLayout.job): what is there dies
            g.kill_all()
        g.remove()


class HostRuntime(Runtime):
    name = "host"

    def __init__(
        self,
        stop_grace_s: float,
        agent_home: str = "",
        cgroups: bool = True,
        env_cache: EnvCache | None = None,
        job_user: JobUser | None = None,
        pids_limit: int = DEFAULT_PIDS_LIMIT,
    ) -> None:
        self.stop_grace_s = stop_grace_s
        self.job_user = job_user  # None: jobs run as the agent's own user
        self.pids_limit = pids_limit
        self.agent_home = agent_home
        self.use_cgroups = cgroups
        self.env_cache = env_cache
        self._layout: CgroupLayout | None = None
        self._remover = GroupRemover()
        self._prepared: dict[str, _Prepared] = {}  # job id -> made by preparation(), for start() to take
        # Starts the job user's shells (agent/spawner.py), made at the first job: its marker is the jobs'.
        self._spawner: Spawner | None = None

    async def _get_layout(self, agent_home: str) -> CgroupLayout:
        """Where this agent's job cgroups go, found once (the first caller's home names it)."""
        if self._layout is None:
            layout = await asyncio.to_thread(CgroupLayout.discover, agent_home)
            if self.pids_limit:
                budget = max(self.pids_limit, await asyncio.to_thread(host_pids_budget))
                await asyncio.to_thread(layout.limit_all_jobs, budget)
            self._layout = layout
        return self._layout

    async def preparation(self, job_id: str, workdir: Path, memory_bytes: int, cpu: float) -> Callable[[], None] | None:
        """The job's folder handed to its user and its cgroups made, on the runner's code-unpacking trip."""
        user = self.job_user
        if not self.use_cgroups and user is None:
            return None
        layout = await self._get_layout(self.agent_home or str(os.getpid())) if self.use_cgroups else None
        prepared = _Prepared(self._job_group(layout, job_id, memory_bytes, cpu) if layout else None)
        self._prepared[job_id] = prepared

        def run() -> None:
            if user is not None:
                give(workdir, user)
            if prepared.cgroup is not None:
                prepared.missing = prepared.cgroup.create()
            prepared.done = True

        return run

    def _job_group(self, layout: CgroupLayout, job_id: str, memory_bytes: int, cpu: float) -> JobCgroup:
        cg = layout.job(job_id, memory_bytes, cpu, self.pids_limit)
        for bad in layout.take_discarded():  # pooled groups not found empty: never a job's
            log.warning("a pooled job cgroup %s was not empty: its processes are killed", bad.paths)
            self._remover.remove(bad)
        return cg

    def _done_with(self, cgroup: JobCgroup) -> None:
        """A finished job's group: kept for the next job where it can be (CgroupLayout.give_back), else removed
        off the job's path."""
        if self._layout is None or not self._layout.give_back(cgroup):
            self._remover.remove(cgroup)

    def forget(self, job_id: str) -> None:
        prepared = self._prepared.pop(job_id, None)
        if prepared is not None and prepared.cgroup is not None:  # never started: its group goes
            self._remover.remove(prepared.cgroup)

    async def _prepare(self, job: RuntimeJob) -> JobCgroup | None:
        prepared = self._prepared.pop(job.job_id, None)
        if prepared is not None and prepared.done:
            return self._created(job, prepared.cgroup, prepared.missing)
        if prepared is not None and prepared.cgroup is not None:  # its trip failed part way
            await self._release(prepared.cgroup)
        return await self._prepare_now(job)

    def _created(self, job: RuntimeJob, cg: JobCgroup | None, missing: list[str]) -> JobCgroup | None:
        if "pids" in missing:  # the agent's policy, not the job's request: said once, in the agent's log
            missing.remove("pids")
            warn_once("pids-job", f"host jobs run without a pids limit (--pids-limit {self.pids_limit}): no cgroup")
        if missing:
            job.system_line(
                f"dstack: this host cannot limit the job's {' and '.join(missing)} (no writable cgroup controller)"
            )
        return cg

    async def _prepare_now(self, job: RuntimeJob) -> JobCgroup | None:
        """The job's folder handed to its user, and its cgroups: one trip to a worker thread for both."""
        user = self.job_user
        if not self.use_cgroups:
            if user is not None:
                await asyncio.to_thread(give, job.workdir, user)
            return None
        layout = await self._get_layout(self.agent_home or str(os.getpid()))
        cg = self._job_group(layout, job.job_id, job.memory_bytes, job.cpu)

        def prepare() -> list[str]:
            if user is not None:
                give(job.workdir, user)
            return cg.create()

        return self._created(job, cg, await asyncio.to_thread(prepare))

    async def start(self, job: RuntimeJob) -> JobProcess:
        if job.mounts:  # the runner refuses them first; never a folder at that path on the host
            raise RuntimeError_("absolute artifact paths are folders inside a container: this agent has none")
        rel = working_subdir(job)
        cwd = job.workdir / rel
        env = dict(job.env)
        if job.gpu_indices:
            env.update(gpu_env(job))
        else:
            env.setdefault("CUDA_VISIBLE_DEVICES", "")
        if self.env_cache is not None and applies_to(job.provider):
            env.update(self.env_cache.host_env())  # the agent's, whatever the workflow's environment says
            env[REPORT_VAR] = str(job.workdir / REPORT_FILE)
        if job.provider_program:
            env = provider_env(env, str(job.workdir), str(COMPAT_DIR))
        user = self.job_user
        if user is not None:  # the job's folder becomes its user's (in _prepare); its HOME is in it
            env.update(HOME=str(job.workdir / JOB_HOME), USER=user.name, LOGNAME=user.name)
        cgroup = await self._prepare(job)
        script = _script(job)
        if user is not None:
            spawner = self._spawner_for(user, env)
            if await spawner.usable():
                return await self._spawn(spawner, user, job, cwd, rel, env, cgroup, script)
        if user is None:
            argv = ["bash", "-c", (cgroup.join_script() if cgroup else "") + script]
        else:
            # Not `user=`: that makes the interpreter fork() this process, gRPC threads and all,
            # instead of vfork(); the job's own user is set by setpriv after exec.
            argv = jobuser.command(user, script)
        # The job user's shell reads its environment from a plain pipe (not an asyncio transport): the
        # agent moves it into its cgroups and then writes the environment (_hand_over_env).
        env_pipe = os.pipe() if user is not None else None
        rest = b""  # of the environment, for a worker thread to write (a full pipe)
        try:
            if env_pipe is not None and user is not None:
                # Its shell opens the pipe again by name (BASH_ENV=/dev/fd/0), as the job user: the pipe is
                # the job user's, as everything else of the job is (its own processes may read it anyway).
                os.fchown(env_pipe[0], user.uid, user.gid)
            # On the event loop, as asyncio's subprocess_exec also spawns: vfork, and the exec's outcome read.
            popen = subprocess.Popen(  # noqa: ASYNC220 - vfork: it returns once the child has exec'd
                argv,
                cwd=cwd,
                env=env if user is None else jobuser.root_env({AGENT_MARKER: env.get(AGENT_MARKER, "")}),
                stdin=subprocess.DEVNULL if env_pipe is None else env_pipe[0],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except FileNotFoundError as e:
            _close_pipe(env_pipe)
            await self._release(cgroup)
            if not await asyncio.to_thread(cwd.is_dir):
                raise RuntimeError_(f"working_dir {rel!r} does not exist in the code") from e
            raise RuntimeError_(f"cannot start the job: {e}") from e
        except OSError as e:
            _close_pipe(env_pipe)
            await self._release(cgroup)
            raise RuntimeError_(f"cannot start the job: {e}") from e
        if env_pipe is not None:  # the job user's shell waits for its environment
            os.close(env_pipe[0])  # the shell's end
            rest = _hand_over_env(env_pipe[1], cgroup, popen.pid, jobuser.encode_env(env))
        proc = HostProcess(popen, self.stop_grace_s, cgroup, job.system_line, self._done_with)
        if rest and env_pipe is not None:
            await asyncio.to_thread(_write_rest, env_pipe[1], rest)
        return proc

    def _spawner_for(self, user: JobUser, env: dict[str, str]) -> Spawner:
        if self._spawner is None:
            self._spawner = Spawner(user, jobuser.root_env({AGENT_MARKER: env.get(AGENT_MARKER, "")}))
            del self._spawner.env["BASH_ENV"]  # its own environment; each job's shell gets root_env
        return self._spawner

    async def _spawn(
        self,
        spawner: Spawner,
        user: JobUser,
        job: RuntimeJob,
        cwd: Path,
        rel: str,
        env: dict[str, str],
        cgroup: JobCgroup | None,
        script: str,
    ) -> JobProcess:
        """The job's shell started by the job user's spawner; then, as with setpriv, moved into its cgroups
        before it gets its environment (it runs nothing of the job's until then)."""
        env_pipe, out, err = os.pipe(), os.pipe(), os.pipe()
        ours = [env_pipe[1], out[0], err[0]]
        try:
            os.fchown(env_pipe[0], user.uid, user.gid)  # the job user's, as everything of the job is
            spawned = await spawner.spawn(
                jobuser.shell_command(user, script),
                cwd,
                jobuser.root_env({AGENT_MARKER: env.get(AGENT_MARKER, "")}),
                (env_pipe[0], out[1], err[1]),
            )
        except SpawnError as e:
            _close_pipe(tuple(ours))
            await self._release(cgroup)
            if e.not_found and not await asyncio.to_thread(cwd.is_dir):
                raise RuntimeError_(f"working_dir {rel!r} does not exist in the code") from e
            raise RuntimeError_(f"cannot start the job: {e.strerror}") from e
        except (SpawnerGone, OSError) as e:
            _close_pipe(tuple(ours))
            await self._release(cgroup)
            raise RuntimeError_(f"cannot start the job: {e}") from e
        except asyncio.CancelledError:  # a shell started anyway reads an empty environment and runs nothing
            _close_pipe(tuple(ours))
            if cgroup is not None:
                self._remover.remove(cgroup)
            raise
        finally:
            _close_pipe((env_pipe[0], out[1], err[1]))  # the shell's ends: its own copies are open
        shell = SpawnedShell(spawner, spawned, out[0], err[0])
        rest = _hand_over_env(env_pipe[1], cgroup, spawned.pid, jobuser.encode_env(env))
        proc = HostProcess(shell, self.stop_grace_s, cgroup, job.system_line, self._done_with)
        if rest:
            await asyncio.to_thread(_write_rest, env_pipe[1], rest)
        return proc

    async def close(self) -> None:
        if self._spawner is not None:
            spawner, self._spawner = self._spawner, None
            await spawner.close()
        await self._remover.drain()
        if self._layout is not None:  # the jobs' parent groups, empty now (a job left over keeps its own)
            await asyncio.to_thread(self._layout.remove)

    async def _release(self, cgroup: JobCgroup | None) -> None:
        if cgroup is not None:
            await asyncio.to_thread(cgroup.remove)

    async def cleanup_leftovers(self, agent_home: str) -> None:
        def kill_all() -> int:
            killed = 0
            for p in psutil.process_iter(["pid"]):
                with contextlib.suppress(psutil.Error, OSError):
                    if p.pid != os.getpid() and p.environ().get(AGENT_MARKER) == agent_home:
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.killpg(os.getpgid(p.pid), signal.SIGKILL)
                        p.kill()
                        killed += 1
            return killed

        killed = await asyncio.to_thread(kill_all)
        if self.use_cgroups:  # and what escaped the session but stayed in its job's cgroup
            for cg in (await self._get_layout(agent_home)).leftovers():
                killed += await asyncio.to_thread(cg.kill_all)
                await asyncio.to_thread(cg.remove)
        if killed:
            log.warning("killed %d process(es) left by jobs of a previous agent run", killed)
