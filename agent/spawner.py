"""The agent's side of the job user's spawner (agent/spawner_main.py): a root agent's host jobs started
without a setpriv per job.

A root agent runs each host job as the job user. Popen(user=...) would make CPython fork() the agent
(threads, gRPC and all) instead of vfork(), so jobs went through `setpriv ... -- bash`: an exec more per
job, about 1 ms of CPU (bench.host_path). Instead, once per agent, setpriv starts one small Python
process as the job user (the same uid, gid, no supplementary groups, no capabilities: what setpriv gave
every job), and that process vforks and execs each job's shell. It never holds more than a job does, so
a job that reaches it gains nothing; one that kills or stops it only makes the agent start another (a
job's start waits at most SPAWN_TIMEOUT_S for its answer), and the jobs it had started then fail with
their exit status lost. Nothing runs as root in its place: when no spawner can be started (no Python
the job user can execute), jobs go through setpriv as before.

What the agent trusts of its answers: a pid is used only when the pidfd sent with it names that pid and
the process is the job user's, so even a spawner taken over could not make the agent move or kill a
process of another user.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dstack.agent.jobuser import JobUser

log = logging.getLogger("dstack.agent")

# How often a wait for the spawner (a job's start, or its exit status once it has exited) looks whether it
# is stopped (SIGSTOP: a job may do that, the same user): a stopped one is replaced. A slow one, on a
# loaded machine, is waited for: replacing it would fail every job it was starting.
SPAWN_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 300.0  # its interpreter's start, however loaded the machine (a stopped one: at once)
INTERPRETERS = ("/usr/bin/python3", "/usr/local/bin/python3")  # after the agent's own: the job user may not reach it
_SOURCE = Path(__file__).with_name("spawner_main.py")


class SpawnerGone(Exception):
    """The spawner exited, or did not answer in time: another is started for the next job."""


class SpawnError(OSError):
    """The spawner could not start the job (Popen's error, with its errno)."""

    def __init__(self, errno: int, text: str, not_found: bool) -> None:
        super().__init__(errno, text)
        self.not_found = not_found


@dataclass
class Spawned:
    pid: int
    pidfd: int  # the agent's own: a handle on the job's shell that no pid reuse can redirect
    spawner_pid: int  # whose child it is: only that spawner can give its exit status


class Spawner:
    """One spawner process as the job user, started at the first job, on the event loop that uses it."""

    def __init__(self, user: JobUser, env: dict[str, str]) -> None:
        self.user = user
        self.env = env  # its own environment: PATH and the agent's marker (a crashed agent's is found by it)
        self.unavailable = False  # no interpreter the job user can run: jobs go through setpriv
        self.proc: subprocess.Popen[bytes] | None = None
        self._interpreter: str | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[Any, asyncio.Future[tuple[dict[str, Any], list[int]]]] = {}
        self._ids = itertools.count(1)
        self._starting: asyncio.Lock | None = None  # one start at a time, on its loop: jobs start at once
        self._starting_loop: asyncio.AbstractEventLoop | None = None
        self._source = ""  # spawner_main.py's text, read once (off the event loop)

    # -- the process -----------------------------------------------------------------------------------

    def _launch(self, interpreter: str, source: str) -> None:
        agent_end, spawner_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # A job's script can be as long as one argument may be (128 KiB): room for it in one packet.
            agent_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            argv = [
                self.user.setpriv,
                f"--reuid={self.user.reuid}",
                f"--regid={self.user.regid}",
                "--clear-groups",
                "--",
                interpreter,
                "-I",  # no PYTHON* variable, no user site, no script folder on the path
                "-S",
                "-c",
                source,
                str(spawner_end.fileno()),
            ]
            self.proc = subprocess.Popen(
                argv,
                env=self.env,
                cwd="/",
                stdin=subprocess.DEVNULL,
                pass_fds=(spawner_end.fileno(),),
                start_new_session=True,
            )
        except BaseException:
            agent_end.close()
            raise
        finally:
            spawner_end.close()
        agent_end.setblocking(False)
        self._sock = agent_end
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(agent_end.fileno(), self._on_readable)

    async def _ensure(self) -> None:
        loop = asyncio.get_running_loop()
        if self._sock is not None and self._loop is loop:
            return
        if self._starting is None or self._starting_loop is not loop:
            self._starting, self._starting_loop = asyncio.Lock(), loop
        async with self._starting:
            if self._sock is not None and self._loop is loop:
                return
            self._drop("another event loop uses it" if self._sock is not None else "")
            candidates = [self._interpreter] if self._interpreter else _candidates()
            if not self._source:
                self._source = await asyncio.to_thread(_SOURCE.read_text)
            for interpreter in candidates:
                self._launch(interpreter, self._source)
                fut = self._future("ready")
                try:
                    assert self.proc is not None
                    await asyncio.wait_for(self._while_not_stopped(fut, self.proc), READY_TIMEOUT_S)
                except (SpawnerGone, TimeoutError):
                    self._drop("")
                    continue
                self._interpreter = interpreter
                return
            if not self._interpreter:
                self.unavailable = True
                log.warning(
                    "no Python the job user %s can run (%s): its host jobs are started through setpriv",
                    self.user.name,
                    ", ".join(candidates),
                )
            raise SpawnerGone("the job user's spawner did not start")

    def _drop(self, why: str) -> None:
        """Ends this spawner (killed: it may be stopped) and fails what waited on it."""
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()
        if why and self._interpreter:  # not while trying interpreters
            log.warning("the job user's spawner is replaced: %s", why)
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.poll()  # reaped now or by subprocess's bookkeeping at the next Popen
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(SpawnerGone(why or "the spawner exited"))

    async def close(self) -> None:
        """The agent stops: the spawner exits at its end's close (its jobs are the runtime's to stop)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()
        proc, self.proc = self.proc, None
        if proc is not None:
            await asyncio.to_thread(_end, proc)

    async def usable(self) -> bool:
        """Started (at the first job): False where no interpreter the job user can run was found."""
        if not self.unavailable:
            with contextlib.suppress(SpawnerGone):  # the job's spawn tries again, and fails the job if it must
                await self._ensure()
        return not self.unavailable

    # -- messages --------------------------------------------------------------------------------------

    def _future(self, key: Any) -> asyncio.Future[tuple[dict[str, Any], list[int]]]:
        assert self._loop is not None
        fut = self._pending[key] = self._loop.create_future()
        return fut

    def _on_readable(self) -> None:
        while self._sock is not None:
            try:
                data, fds, _flags, _ = socket.recv_fds(self._sock, 1 << 16, 1)
            except BlockingIOError:
                return
            except OSError as e:
                self._drop(f"its socket failed: {e}")
                return
            if not data:
                self._drop("it exited")
                return
            try:
                msg = json.loads(data)
                key = "ready" if "ready" in msg else msg["id"]
            except (ValueError, KeyError, TypeError):
                _close_all(fds)
                self._drop("it sent what is not an answer")
                return
            fut = self._pending.pop(key, None)
            if fut is None or fut.done():
                _close_all(fds)
            else:
                fut.set_result((msg, fds))

    async def _ask(self, msg: dict[str, Any], fds: Sequence[int] = ()) -> tuple[dict[str, Any], list[int], int]:
        """The answer, its fds, and the pid of the spawner that gave it."""
        await self._ensure()
        sock, loop, proc = self._sock, self._loop, self.proc
        assert sock is not None and loop is not None and proc is not None
        msg["id"] = next(self._ids)
        fut = self._future(msg["id"])
        data = json.dumps(msg).encode()
        while True:
            try:
                socket.send_fds(sock, [data], list(fds))
                break
            except BlockingIOError:  # the spawner is behind (or stopped): the wait below bounds it
                writable: asyncio.Future[None] = loop.create_future()
                loop.add_writer(sock.fileno(), _set_once, writable)
                try:
                    await self._while_not_stopped(writable, proc)
                finally:
                    loop.remove_writer(sock.fileno())
            except OSError as e:
                self._drop(f"its socket failed: {e}")
                raise SpawnerGone(str(e)) from e
        try:
            await self._while_not_stopped(fut, proc)
        except asyncio.CancelledError:  # the job's start was given up: a shell started anyway is let go
            fut.add_done_callback(self._late)
            raise
        answer, answer_fds = fut.result()
        return answer, answer_fds, proc.pid

    async def _while_not_stopped(self, fut: asyncio.Future[Any], proc: subprocess.Popen[bytes]) -> None:
        """Waits for fut, however long a running spawner takes; one found stopped is replaced (SpawnerGone)."""
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(fut), SPAWN_TIMEOUT_S)
                return
            except TimeoutError:
                if _stopped(proc.pid):
                    if self.proc is proc:
                        self._drop("it was stopped (SIGSTOP)")
                    raise SpawnerGone("the spawner was stopped") from None

    async def spawn(self, argv: list[str], cwd: Path, env: dict[str, str], stdio: tuple[int, int, int]) -> Spawned:
        """The job's shell, started as the job user in a session of its own, with these fds as 0, 1, 2."""
        msg, fds, owner = await self._ask({"op": "spawn", "argv": argv, "cwd": str(cwd), "env": env}, stdio)
        if "error" in msg:
            _close_all(fds)
            raise SpawnError(int(msg.get("errno") or 0), str(msg["error"]), bool(msg.get("not_found")))
        pid = msg.get("pid")
        if not isinstance(pid, int) or len(fds) != 1 or not self._is_job_users(pid, fds[0]):
            _close_all(fds)
            self._drop(f"its answer named process {pid!r}, not one of the job user's it started")
            raise SpawnerGone("the spawner's answer was refused")
        return Spawned(pid, fds[0], owner)

    def _is_job_users(self, pid: int, pidfd: int) -> bool:
        """The pidfd names this pid, and the process runs as the job user (not the agent's, not root's)."""
        try:
            with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
                if f"\nPid:\t{pid}\n".encode() not in b"\n" + f.read():
                    return False
            return os.stat(f"/proc/{pid}").st_uid == self.user.uid
        except OSError:
            return False

    async def reap(self, spawned: Spawned) -> int | None:
        """The exit status of a job's shell that has exited (as Popen.returncode); None if it was lost
        (its spawner died: the shell was reaped by another)."""
        if self.proc is None or self.proc.pid != spawned.spawner_pid:
            return None
        pid = spawned.pid
        try:
            msg, fds, _ = await self._ask({"op": "reap", "pid": pid})
        except SpawnerGone:
            return None
        _close_all(fds)
        status = msg.get("status")
        return status if isinstance(status, int) else None

    def _late(self, fut: asyncio.Future[tuple[dict[str, Any], list[int]]]) -> None:
        """An answer nobody waits for any more: its pidfd closed, and a shell it started reaped once it
        exits (it gets no environment, so it runs nothing of the job's: its check fails)."""
        if fut.cancelled() or fut.exception() is not None:
            return
        msg, fds = fut.result()
        _close_all(fds)
        pid = msg.get("pid")
        if isinstance(pid, int) and self.proc is not None:
            self.forget(Spawned(pid, -1, self.proc.pid))

    def forget(self, spawned: Spawned) -> None:
        """A job the agent will not wait for (it is stopping): reaped once it exits, status unread."""
        if self._sock is None or self._loop is not asyncio.get_running_loop() or self.proc is None:
            return
        if self.proc.pid != spawned.spawner_pid:
            return
        pid = spawned.pid
        with contextlib.suppress(OSError):
            socket.send_fds(self._sock, [json.dumps({"op": "reap", "id": f"forget-{pid}", "pid": pid}).encode()], [])


def _stopped(pid: int) -> bool:
    """Whether the process is stopped (or gone): its state in /proc/PID/stat, after its name's parenthesis."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t", b"Z", b"X")
    except (OSError, IndexError):
        return True


def _end(proc: subprocess.Popen[bytes]) -> None:
    """Waits for a spawner whose socket was closed to exit (at once), killing one that does not."""
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _candidates() -> list[str]:
    found: list[str] = []
    for path in (sys.executable, *INTERPRETERS):
        if path and path not in found and os.access(path, os.X_OK):
            found.append(path)
    return found


def _set_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
