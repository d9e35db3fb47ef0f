"""cgroup v1 groups for host-process jobs: memory and CPU limits, and every process of the job in one place.

Each job gets `<agent's own group>/dstack-<agent>/<job>` in the memory and cpu hierarchies (nested under
the agent's group, so the agent's own limits still apply). The job's shell joins them before it runs
anything, so all it starts (also what leaves its session with setsid) is in the group, and killed
with it when the job ends. Where the hierarchies are missing or not writable (cgroup v2, no root),
jobs run without limits and the agent says so once in its log and in the job's log.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shlex
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("dstack.agent")
CFS_PERIOD_US = 100_000
_warned: set[str] = set()


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
            if opt in ("memory", "cpu"):
                out[opt] = Path(parts[4])
    return out


def _own_groups(proc_cgroup: str = "/proc/self/cgroup") -> dict[str, str]:
    """controller -> this process's group path in it (e.g. memory -> /system.slice/dstack-agent.service)."""
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


@dataclass
class CgroupLayout:
    """Where this agent's job groups live, per controller (found once at agent start)."""

    dirs: dict[str, Path] = field(default_factory=dict)  # controller -> <mount>/<agent group>/dstack-<agent>

    @classmethod
    def discover(cls, agent_home: str) -> CgroupLayout:
        tag = "dstack-" + hashlib.sha256(agent_home.encode()).hexdigest()[:12]
        mounts, own = _mounts(), _own_groups()
        dirs = {}
        for ctrl, mount in mounts.items():
            d = mount / own.get(ctrl, "/").lstrip("/") / tag
            try:
                d.mkdir(parents=True, exist_ok=True)
                dirs[ctrl] = d
            except OSError as e:
                _warn_once(ctrl, f"cgroup v1 {ctrl} controller not writable ({e}): no {ctrl} limits for host jobs")
        for ctrl in ("memory", "cpu"):
            if ctrl not in mounts:
                _warn_once(ctrl, f"no cgroup v1 {ctrl} hierarchy: host jobs run without {ctrl} limits")
        return cls(dirs)

    def job(self, job_id: str, memory_bytes: int, cpu: float) -> JobCgroup:
        return JobCgroup(job_id, {c: d / job_id for c, d in self.dirs.items()}, memory_bytes, cpu)

    def leftovers(self) -> list[JobCgroup]:
        out: dict[str, dict[str, Path]] = {}
        for ctrl, d in self.dirs.items():
            with contextlib.suppress(OSError):
                for sub in d.iterdir():
                    if sub.is_dir():
                        out.setdefault(sub.name, {})[ctrl] = sub
        return [
            JobCgroup(job_id, paths, 0, 0.0, [p / "cgroup.procs" for p in paths.values()])
            for job_id, paths in out.items()
        ]


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


@dataclass
class JobCgroup:
    job_id: str
    paths: dict[str, Path]  # controller -> the job's group
    memory_bytes: int
    cpu: float
    joined: list[Path] = field(default_factory=list)  # groups created, whose cgroup.procs the shell joins

    def create(self) -> list[str]:
        """Creates the groups and sets the limits; returns what could not be enforced (for the job's log)."""
        missing = []
        for ctrl, path in self.paths.items():
            try:
                path.mkdir(exist_ok=True)
                if ctrl == "memory" and self.memory_bytes:
                    (path / "memory.limit_in_bytes").write_text(str(self.memory_bytes))
                    with contextlib.suppress(OSError):  # no swap beyond the limit, where swap accounting is on
                        (path / "memory.memsw.limit_in_bytes").write_text(str(self.memory_bytes))
                if ctrl == "cpu" and self.cpu:
                    (path / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
                    (path / "cpu.cfs_quota_us").write_text(str(max(1000, int(self.cpu * CFS_PERIOD_US))))
                self.joined.append(path / "cgroup.procs")
            except OSError as e:
                log.warning("job %s: cgroup %s: %s", self.job_id, path, e)
        if self.memory_bytes and "memory" not in self.paths:
            missing.append("memory")
        if self.cpu and "cpu" not in self.paths:
            missing.append("cpu")
        for ctrl in ("memory", "cpu"):
            if ctrl in self.paths and self.paths[ctrl] / "cgroup.procs" not in self.joined:
                if (ctrl == "memory" and self.memory_bytes) or (ctrl == "cpu" and self.cpu):
                    missing.append(ctrl)
        return missing

    def join_script(self) -> str:
        """Shell lines that move the job's shell (and so all it starts) into its groups."""
        return "".join(f"echo $$ > {shlex.quote(str(p))} 2>/dev/null || true\n" for p in self.joined)

    def pids(self) -> set[int]:
        out: set[int] = set()
        for procs in self.joined:
            with contextlib.suppress(OSError, ValueError):
                out.update(int(x) for x in procs.read_text().split())
        return out

    def oom_killed(self) -> bool:
        path = self.paths.get("memory")
        if path is None:
            return False
        with contextlib.suppress(OSError, ValueError):
            for line in (path / "memory.oom_control").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        return False

    def kill_all(self) -> int:
        """SIGKILLs every process still in the job's groups (also those that left its session)."""
        killed = 0
        for _ in range(50):  # processes forking while being killed: repeat until the group is empty
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
            time.sleep(0.01)
        return killed

    def remove(self) -> None:
        for path in self.paths.values():
            for _ in range(50):  # rmdir fails while the last killed processes are still exiting
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
