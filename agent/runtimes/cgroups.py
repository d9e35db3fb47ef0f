"""cgroups for host-process jobs: memory, CPU and pids limits, and every process of the job in one place.

Two layouts, one code path:

- cgroup v1 (and the hybrid layout, where the controllers are bound to v1 hierarchies): each job gets
  `<mount>/<agent's own group>/dstack-<agent>/<job>` in the pids hierarchy, and in the memory and cpu
  hierarchies where it asks for a memory or CPU limit;
- cgroup v2 (the unified hierarchy alone at the root, with `cgroup.controllers`: current Debian and
  Ubuntu): the job gets `<root>/<agent's own group>/dstack-<agent>/<job>`, with the controllers turned
  on for it through `cgroup.subtree_control` on the way down. v2 lets no group with processes hand
  controllers to its children, so the agent first moves itself (and whatever shares its group) into
  a leaf `<agent's group>/agent`; under systemd that needs `Delegate=yes`, which deploy's unit sets.

Groups nest under the agent's own, so the agent's own limits still apply. The job's shell joins its
groups before it runs anything, so all it starts (also what leaves its session with setsid) is in
them, and killed with them when the job ends. Where no controller is writable (no root, no
delegation) jobs run without those limits and the agent says so once in its log and in the job's log.

The file-system root and the /proc files read are parameters: the v2 path is unit-tested against a
folder that looks like cgroupfs (tests/unit/test_cgroups.py), as few CI hosts can delegate v2.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shlex
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("dstack.agent")
CFS_PERIOD_US = 100_000
# Enough for real ML jobs, far below a host's pid space (32768, or 4194304 under systemd). A process is
# one pid and each of its threads another, and thread pools size themselves by the cores: a DataLoader
# worker started with `spawn` loads OpenBLAS/OpenMP (a thread per core), a HF tokenizer has a Rayon pool
# per process. So 4096, or 32 per core on big hosts (16 workers x 192 cores would pass 4096).
DEFAULT_PIDS_LIMIT = max(4096, 32 * (os.cpu_count() or 1))
CONTROLLERS = ("memory", "cpu", "pids")
ROOT = Path("/sys/fs/cgroup")
V2_AGENT_LEAF = "agent"  # where a v2 agent moves itself so that its group may delegate controllers
# Job groups kept for reuse, at most: enough for the jobs one agent runs at once, few enough that an
# idle agent holds a handful of empty folders in cgroupfs.
POOL_MAX = 64
POOL_PREFIX = "pool-"  # a reused group's name: never a job's id (a job's next attempt must not share it)
_warned: set[str] = set()
# A job group's folder, held open by the agent while the group lives: its files are opened relative to it
# (openat), not by walking the group's long path through kernfs on each of a job's ~5 opens. O_PATH: a handle
# to the folder, not a read of it; O_CLOEXEC: never a job's (a job must hold nothing of the agent's).
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


def _mounts(mountinfo: str = "/proc/self/mountinfo") -> dict[str, Path]:
    """controller -> mount point of its cgroup v1 hierarchy."""
    out: dict[str, Path] = {}
    try:
        text = Path(mountinfo).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if len(parts) < 5 or len(rparts) < 3 or rparts[0] != "cgroup":
            continue
        for opt in rparts[2].split(","):
            if opt in CONTROLLERS:
                out[opt] = Path(parts[4])
    return out


def _own_groups(proc_cgroup: str = "/proc/self/cgroup") -> dict[str, str]:
    """controller -> this process's group path in it (e.g. memory -> /system.slice/dstack-agent.service);
    the unified (v2) hierarchy's line `0::/path` is under the key ""."""
    out: dict[str, str] = {}
    try:
        text = Path(proc_cgroup).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for ctrl in parts[1].split(","):
                out[ctrl] = parts[2]
    return out


def is_unified(root: Path = ROOT) -> bool:
    """The pure v2 layout: the unified hierarchy itself is mounted at the root (it has cgroup.controllers)."""
    return (root / "cgroup.controllers").is_file()


def host_pids_budget(proc_sys: Path = Path("/proc/sys/kernel")) -> int:
    """The pids all jobs may hold together: three quarters of what the host can have (the smaller of
    pid_max and threads-max), the rest kept for the agent, sshd and the system. 0 where unknown."""
    try:
        room = min(int((proc_sys / name).read_text()) for name in ("pid_max", "threads-max"))
    except (OSError, ValueError):
        return 0
    return room * 3 // 4


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def _read(path: Path) -> bytes:
    """A cgroupfs file's content: one open and read, without a text wrapper (a job's path reads several)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def _read_int_keys(path: Path) -> dict[str, int]:
    """A flat-keyed cgroup file (`memory.events`, `pids.events`, `memory.oom_control`) as key -> number."""
    try:
        return _int_keys(_read(path))
    except OSError:
        return {}


def pids_limit_line(limit: int, hits: int) -> str:
    """The job's log line when its forks failed on the pids limit."""
    return (
        f"dstack: the job hit its pids limit ({limit}): fork failed {hits} time(s)"
        " (processes and threads count; the agent's --pids-limit sets it)"
    )


def pids_limit_hits(events: Path) -> int:
    """How often a fork or clone failed on the pids limit (`max` in pids.events: v1 and v2 alike)."""
    return _read_int_keys(events).get("max", 0)


def _int_keys(text: bytes) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.decode().splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


@dataclass
class CgroupLayout:
    """Where this agent's job groups live (found once at agent start)."""

    dirs: dict[str, Path] = field(default_factory=dict)  # controller -> <hierarchy>/<agent group>/dstack-<agent>
    v2: bool = False  # one unified dir for every controller
    # Empty groups of finished jobs without memory or CPU limits, for the next such job: a job's mkdir, limit
    # write and rmdir in cgroupfs (and the rmdir's retries while its last processes go) become none.
    pool: list[JobCgroup] = field(default_factory=list)
    # Pooled groups found not empty when taken (only a job running as the agent's own user could put a
    # process there): the runtime kills what is in them and removes them (take_discarded).
    discarded: list[JobCgroup] = field(default_factory=list)

    @classmethod
    def discover(
        cls,
        agent_home: str,
        root: Path = ROOT,
        mountinfo: str = "/proc/self/mountinfo",
        proc_cgroup: str = "/proc/self/cgroup",
    ) -> CgroupLayout:
        tag = "dstack-" + hashlib.sha256(agent_home.encode()).hexdigest()[:12]
        own = _own_groups(proc_cgroup)
        if is_unified(root):
            return cls._discover_v2(root / own.get("", "/").lstrip("/"), tag)
        mounts = _mounts(mountinfo)
        dirs = {}
        for ctrl, mount in mounts.items():
            d = mount / own.get(ctrl, "/").lstrip("/") / tag
            try:
                d.mkdir(parents=True, exist_ok=True)
                dirs[ctrl] = d
            except OSError as e:
                warn_once(ctrl, f"cgroup v1 {ctrl} controller not writable ({e}): no {ctrl} limits for host jobs")
        for ctrl in CONTROLLERS:
            if ctrl not in mounts:
                warn_once(ctrl, f"no cgroup v1 {ctrl} hierarchy: host jobs run without {ctrl} limits")
        return cls(dirs)

    @classmethod
    def _discover_v2(cls, own: Path, tag: str) -> CgroupLayout:
        """v2: turns the controllers on from the agent's group down to its jobs' parent."""
        try:
            available = set((own / "cgroup.controllers").read_text().split())
        except OSError as e:
            warn_once("v2", f"cgroup v2: cannot read {own}/cgroup.controllers ({e}): host jobs run without limits")
            return cls(v2=True)
        wanted = [c for c in CONTROLLERS if c in available]
        for ctrl in CONTROLLERS:
            if ctrl not in available:
                warn_once(
                    ctrl,
                    f"cgroup v2: the {ctrl} controller is not delegated to {own} (systemd: Delegate=yes):"
                    f" host jobs run without {ctrl} limits",
                )
        if not wanted:
            return cls(v2=True)
        parent = own / tag
        try:
            _leave_inner_group(own)
            _enable(own, wanted)
            parent.mkdir(exist_ok=True)
            _enable(parent, wanted)
        except OSError as e:
            warn_once(
                "v2",
                f"cgroup v2: cannot set up job groups under {own} ({e}): host jobs run without limits; the agent"
                " needs a cgroup of its own (systemd: a service with Delegate=yes, as deploy/systemd sets)",
            )
            return cls(v2=True)
        return cls({c: parent for c in wanted}, v2=True)

    def limit_all_jobs(self, pids: int) -> None:
        """Bounds the pids of all this agent's jobs together (their parent group), so that several jobs at
        their own limits (a user's fork bombs, one per job) still leave the host pids to run on."""
        parent = self.dirs.get("pids")
        if parent is None or pids <= 0:
            return
        try:
            (parent / "pids.max").write_text(str(pids))
        except OSError as e:
            warn_once("pids-all", f"cannot bound the pids of all jobs together in {parent}: {e}")

    def remove(self) -> None:
        """Removes the pooled groups, then the jobs' parent groups where they are empty (the agent stops:
        it leaves no trace)."""
        pool, self.pool = self.pool, []
        for cg in pool:
            cg.remove()
        for parent in set(self.dirs.values()):
            with contextlib.suppress(OSError):  # not empty: a job's group is left, for the next start
                parent.rmdir()

    def job(self, job_id: str, memory_bytes: int, cpu: float, pids_limit: int = 0) -> JobCgroup:
        """The job's groups: a pooled one where the job asks for no memory or CPU limit (most jobs), else new.

        A pooled group is checked empty here (one read of its cgroup.procs, kernel memory: fine on the
        event loop): a group with a process in it is never handed to a job; it goes to `discarded`."""
        poolable = not memory_bytes and not cpu
        if poolable:
            while self.pool:
                cg = self.pool.pop()
                if cg.pids_limit == pids_limit and not cg.pids():
                    cg.job_id = job_id
                    return cg
                self.discarded.append(cg)
            name = POOL_PREFIX + secrets.token_hex(6)  # mkdir'd without exist_ok: a name in use is refused
        else:
            name = job_id
        cg = JobCgroup(job_id, self._job_paths(name, memory_bytes, cpu), memory_bytes, cpu, pids_limit, self.v2)
        cg.poolable = poolable
        return cg

    def give_back(self, cg: JobCgroup) -> bool:
        """Keeps a finished job's group for the next job when it can be reused as it is: it was made for a job
        without memory or CPU limits, it ended clean (empty when its main process exited: never sealed, no
        out-of-memory kill, no pids limit hit, so its counters still read zero for the next job) and no task
        is left in it, a zombie not yet reaped included (pids.current, or cgroup.procs without a pids
        controller). False: the caller removes it."""
        # Sealed (pids.max 0, and v2's cgroup.kill: a stop's kill_all), or to be sealed by a stop under way.
        sealed = cg.hits_at_kill is not None or cg.stopping
        if not (cg.poolable and cg.created and cg.clean) or sealed or len(self.pool) >= POOL_MAX:
            return False
        if cg.tasks_left():
            return False
        cg.clean = False  # set again by the next job's close_at_once
        self.pool.append(cg)
        return True

    def take_discarded(self) -> list[JobCgroup]:
        out, self.discarded = self.discarded, []
        return out

    def _job_paths(self, job_id: str, memory_bytes: int, cpu: float) -> dict[str, Path]:
        """v2: the job's one folder. v1: a group in each hierarchy whose controller the job uses: the pids
        group always (it holds the pids limit and lists every process of the job, for kill_all), memory
        and cpu only for a job that asks for them. Each v1 group is a mkdir and an rmdir in the kernel
        (a memory group is the dearest), per job: most jobs ask for neither, and a group without a limit
        holds nothing back (an out-of-memory kill without a limit of its own is the host's, not the job's)."""
        if self.v2:
            return {c: d / job_id for c, d in self.dirs.items()}
        wanted = {"pids", *(["memory"] if memory_bytes else []), *(["cpu"] if cpu else [])}
        paths = {c: d / job_id for c, d in self.dirs.items() if c in wanted}
        if "pids" not in paths and self.dirs:  # no pids hierarchy here: another group lists the job's processes
            ctrl, d = next(iter(self.dirs.items()))
            paths.setdefault(ctrl, d / job_id)
        return paths

    def leftovers(self) -> list[JobCgroup]:
        out: dict[str, dict[str, Path]] = {}
        for ctrl, d in self.dirs.items():
            with contextlib.suppress(OSError):
                for sub in d.iterdir():
                    if sub.is_dir():
                        out.setdefault(sub.name, {})[ctrl] = sub
        return [JobCgroup(job_id, paths, v2=self.v2, created=True) for job_id, paths in out.items()]


def _leave_inner_group(own: Path) -> None:
    """v2's "no internal processes": a group that hands controllers to its children holds no process
    itself, so the agent moves into a leaf of its group. Only the agent moves: started from a login
    shell, its group is the session's, whose processes are not the agent's to move (delegating then
    fails, and the agent says to give it a group of its own). The host's root group is exempt, and has
    no `cgroup.type` (a container's namespace root has one: it is not exempt)."""
    if not (own / "cgroup.type").exists():
        return
    leaf = own / V2_AGENT_LEAF
    leaf.mkdir(exist_ok=True)
    (leaf / "cgroup.procs").write_text(str(os.getpid()))


def _enable(group: Path, controllers: list[str]) -> None:
    """Turns the controllers on for the group's children (`+memory +cpu +pids` in cgroup.subtree_control)."""
    (group / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in controllers))


@dataclass
class JobCgroup:
    job_id: str
    paths: dict[str, Path]  # controller -> the job's group (v2: the same folder for each)
    memory_bytes: int = 0
    cpu: float = 0.0
    pids_limit: int = 0  # 0: none
    v2: bool = False
    created: bool = False  # groups exist (made by create(), or found left over)
    limited: set[str] = field(default_factory=set)  # controllers whose limit was written
    hits_at_kill: int | None = None  # pids limit hits when the agent closed the group (kill_all)
    poolable: bool = False  # may be reused by another job once this one ended clean (CgroupLayout.give_back)
    clean: bool = False  # the job's close found the group empty, with no OOM kill and no pids limit hit
    # A stop of the job began (HostProcess.stop): its kill_all, on a worker thread, may seal the group at any
    # moment after the job's own close saw it clean, so the group is never pooled: sealed after it was given
    # back, the next job in it could not fork (pids.max 0), and the stop would kill that job's processes.
    stopping: bool = False
    # group folder -> its fd (_DIR_FLAGS), opened at the first use of one of its files, closed by remove().
    # Behind a lock: the event loop and worker threads both use a group, and an fd closed by one while another
    # opens relative to it could by then be another folder's (fd numbers are reused).
    _dir_fds: dict[Path, int] = field(default_factory=dict, repr=False, compare=False)
    _fd_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _removed: bool = field(default=False, repr=False, compare=False)

    def _groups(self) -> list[Path]:
        return list(dict.fromkeys(self.paths.values()))  # v2: one folder

    def _open(self, group: Path, name: str, flags: int) -> int:
        """A file of one of the job's groups, opened relative to the group's folder fd (see _DIR_FLAGS); by
        its path once the group is removed (then it is most likely gone: the open fails, as it did)."""
        with self._fd_lock:
            if self._removed:
                return os.open(group / name, flags | os.O_CLOEXEC, 0o666)
            folder = self._dir_fds.get(group)
            if folder is None:
                folder = self._dir_fds[group] = os.open(group, _DIR_FLAGS)
            return os.open(name, flags | os.O_CLOEXEC, 0o666, dir_fd=folder)  # Path.write_text's mode

    def _read_file(self, group: Path, name: str) -> bytes:
        fd = self._open(group, name, os.O_RDONLY)
        try:
            return os.read(fd, 1 << 16)
        finally:
            os.close(fd)

    def _write_file(self, group: Path, name: str, value: str, create: bool = True) -> None:
        """One write of the value, opened as Path.write_text opens (O_CREAT|O_TRUNC change nothing of an
        existing cgroupfs file); create=False: a file the kernel may not have is not made."""
        fd = self._open(group, name, os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if create else 0))
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def _close_dirs(self) -> None:
        with self._fd_lock:
            self._removed = True
            fds, self._dir_fds = list(self._dir_fds.values()), {}
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        # A group dropped without remove() (a test's, or one whose creation failed part way): its folder
        # fds go with it. No lock: nothing else refers to the object any more.
        for fd in self.__dict__.get("_dir_fds", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def create(self) -> list[str]:
        """Creates the groups and sets the limits; returns what could not be enforced (for the job's log).
        A pooled group (created by an earlier job, with its limit in place) is used as it is."""
        if self.created:
            return [c for c in CONTROLLERS if c == "pids" and self.pids_limit and c not in self.limited]
        made: list[Path] = []
        for path in self._groups():
            try:
                path.mkdir(exist_ok=not self.poolable)  # a pooled name in use is never shared
                made.append(path)
            except OSError as e:
                log.warning("job %s: cgroup %s: %s", self.job_id, path, e)
        self.paths = {c: p for c, p in self.paths.items() if p in made}
        self.created = bool(self.paths)
        wanted = {"memory": bool(self.memory_bytes), "cpu": bool(self.cpu), "pids": bool(self.pids_limit)}
        for ctrl, path in self.paths.items():
            if not wanted[ctrl]:
                continue
            try:
                self._write_limit(ctrl, path)
                self.limited.add(ctrl)
            except OSError as e:
                log.warning("job %s: cgroup %s limit in %s: %s", self.job_id, ctrl, path, e)
        return [c for c in CONTROLLERS if wanted[c] and c not in self.limited]

    def _write_limit(self, ctrl: str, path: Path) -> None:
        write = self._write_file
        if ctrl == "memory":
            if self.v2:
                write(path, "memory.max", str(self.memory_bytes))
                with contextlib.suppress(OSError):  # no swap beyond the limit, where swap is accounted
                    write(path, "memory.swap.max", "0")
            else:
                write(path, "memory.limit_in_bytes", str(self.memory_bytes))
                with contextlib.suppress(OSError):
                    write(path, "memory.memsw.limit_in_bytes", str(self.memory_bytes))
        elif ctrl == "cpu":
            quota = max(1000, int(self.cpu * CFS_PERIOD_US))
            if self.v2:
                write(path, "cpu.max", f"{quota} {CFS_PERIOD_US}")
            else:
                write(path, "cpu.cfs_period_us", str(CFS_PERIOD_US))
                write(path, "cpu.cfs_quota_us", str(quota))
        elif ctrl == "pids":
            write(path, "pids.max", str(self.pids_limit))  # the same file in v1 and v2

    @property
    def joined(self) -> list[Path]:
        """The cgroup.procs files the job's shell writes itself into."""
        return [p / "cgroup.procs" for p in self._groups()] if self.created else []

    def join_script(self) -> str:
        """Shell lines that move the job's shell (and so all it starts) into its groups."""
        return "".join(f"echo $$ > {shlex.quote(str(p))} 2>/dev/null || true\n" for p in self.joined)

    def join(self, pid: int) -> None:
        """Moves a job user's process into the job's groups: their root-owned files are the agent's to write
        (the job's own shell could not). The process waits for this before it runs a command (it reads its
        environment first, written after this), so what it starts is in the groups too."""
        if not self.created:
            return
        for group in self._groups():
            try:
                self._write_file(group, "cgroup.procs", str(pid))
            except OSError as e:
                log.warning("cannot move job process %d into %s: %s", pid, group, e)

    def pids(self) -> set[int]:
        """What cgroup.procs lists now: read afresh each time (a kept fd of it reads stale or empty)."""
        out: set[int] = set()
        if not self.created:
            return out
        for group in self._groups():
            with contextlib.suppress(OSError, ValueError):
                out.update(int(x) for x in self._read_file(group, "cgroup.procs").split())
        return out

    def tasks_left(self) -> bool:
        """Whether any task still counts in the group: pids.current counts zombies until they are reaped,
        and threads; without a pids controller, cgroup.procs lists what is left. Unreadable: yes."""
        group = self.paths.get("pids")
        if group is None:
            return bool(self.pids())
        try:
            return int(self._read_file(group, "pids.current")) != 0
        except (OSError, ValueError):
            return True

    def oom_killed(self) -> bool:
        path = self.paths.get("memory")
        if path is None:
            return False
        return self._int_keys(path, "memory.events" if self.v2 else "memory.oom_control").get("oom_kill", 0) > 0

    def _int_keys(self, group: Path, name: str) -> dict[str, int]:
        try:
            return _int_keys(self._read_file(group, name))
        except OSError:
            return {}

    def pids_limit_hits(self) -> int:
        """How often the job's fork or clone failed on its pids limit (before the agent ended it)."""
        if self.hits_at_kill is not None:
            return self.hits_at_kill
        path = self.paths.get("pids")
        return self._int_keys(path, "pids.events").get("max", 0) if path is not None else 0

    def close(self) -> tuple[bool, int]:
        """After the job's main process ended: kills what is left in its groups, then says whether it was
        killed for memory and how often it hit its pids limit (one trip to a worker thread for the three)."""
        self.kill_all()
        return self.oom_killed(), self.pids_limit_hits()

    def close_at_once(self) -> tuple[bool, int] | None:
        """close() without waiting, on the caller's thread: the group is sealed and looked at once (cgroupfs
        files live in kernel memory: nothing here waits on a disk). None while processes are still in the
        group (they were sent SIGKILL): the caller then runs close() on a worker thread, which waits for them.
        After a job's main process, its group is most often empty already: no worker-thread trip per job,
        and no seal (an empty group stays empty: only the agent moves processes into it)."""
        if self.pids():
            self._seal()  # before the kill: what forks from now on is refused
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            return None
        oom, hits = self.oom_killed(), self.pids_limit_hits()
        self.clean = not oom and not hits and self.hits_at_kill is None  # never sealed (a stop's kill_all)
        return oom, hits

    def kill_all(self) -> int:
        """SIGKILLs every process still in the job's groups (also those that left its session).

        A fork bomb forks faster than its pids can be listed and killed one by one: its pids.max goes
        to 0 first, so that nothing in the group can fork any more, then the listed processes die."""
        self._seal()
        killed = 0
        for _ in range(200):  # processes forking while being killed: repeat until the group is empty
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
            time.sleep(0.01)
        return killed

    def _seal(self) -> None:
        """No process of the group may fork any more (pids.max 0), and (v2) the whole group is killed."""
        pids_group = self.paths.get("pids")
        if pids_group is not None and self.created and self.hits_at_kill is None:
            self.hits_at_kill = self.pids_limit_hits()  # what the job hit, not the forks refused from now on
            with contextlib.suppress(OSError):
                self._write_file(pids_group, "pids.max", "0")
        if self.v2 and self.created:
            # cgroup.kill (Linux 5.14) kills the whole group at once: nothing forks in between. Older
            # kernels have no such file: the open fails (ENOENT), and kill_all's loop kills one by one.
            for path in self._groups():
                with contextlib.suppress(OSError):
                    self._write_file(path, "cgroup.kill", "1", create=False)

    def remove(self) -> None:
        """Removes the groups, after closing the agent's fds of their folders (an open fd would keep a removed
        group's kernel state alive, and is the agent's to close in any case)."""
        self._close_dirs()
        for path in self._groups():
            for _ in range(50):  # rmdir fails while the last killed processes are still exiting
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def pids_events_of(pid: int, container_id: str, root: Path = ROOT, proc: Path = Path("/proc")) -> Path | None:
    """The pids.events of a container's group, found by its first process, or None where it is not
    visible here (no pids hierarchy). The group's path must name the container (`docker/<id>`,
    `docker-<id>.scope`): a pid from an engine in another pid namespace, or on another host, may
    be an unrelated process here."""
    own = _own_groups(str(proc / str(pid) / "cgroup"))
    if is_unified(root):
        group = own.get("")
        mount: Path | None = root
    else:
        group = own.get("pids")
        mount = _mounts(str(proc / "self" / "mountinfo")).get("pids")
    if mount is None or group is None or not container_id or container_id not in group:
        return None
    return mount / group.lstrip("/") / "pids.events"
