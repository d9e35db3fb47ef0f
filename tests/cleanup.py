"""What the tests' own services leave in the machine's shared places, and its removal.

- The tests' dockerd (tests/dockerd.py) bind-mounts the host's network namespace at `EXEC_ROOT/netns/default`
  and does not unmount it when it stops, so its /tmp/dstack-dockerd-* folder cannot be removed either. The
  `dockerd` fixture unmounts what is mounted under its folder after the engine stops, and at start removes
  the folders of engines that are gone (a test session killed before its teardown).
- An agent makes `dstack-<hash of its home>` cgroups (agent/runtimes/cgroups.py) and removes them when it
  stops; one killed with SIGKILL (many tests do that on purpose) leaves them, and its jobs running in
  them (a `sleep 600` for ten minutes, holding its group). Each `cluster` test's teardown, and the
  session's, kill those jobs' processes and remove the groups of agents whose home is under the test's
  (the session's) temporary folder: never another session's, whose agents may still be running.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from dstack.agent.runtimes.base import AGENT_MARKER
from dstack.agent.runtimes.cgroups import ROOT, JobCgroup, _mounts, _own_groups, is_unified

DOCKERD_PREFIX = "dstack-dockerd-"
# A folder without a pid file yet is an engine starting, unless it is older than this.
STARTING_GRACE_S = 3600.0


def _unescape(field: str) -> str:
    """mountinfo writes a space, tab, newline and backslash in a path as octal escapes (\\040...)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(root: Path, mountinfo: str = "/proc/self/mountinfo") -> list[Path]:
    """Mount points at or under `root`, deepest first (the order to unmount them in)."""
    root = root.resolve()
    found = []
    for line in Path(mountinfo).read_text().splitlines():
        point = Path(_unescape(line.split()[4]))
        if point == root or root in point.parents:
            found.append(point)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unmount_under(root: Path) -> list[Path]:
    """Unmounts everything mounted under `root`; returns what is still mounted there (should be nothing)."""
    for point in mounts_under(root):
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(point)], capture_output=True)  # busy: detached now, freed later
    return mounts_under(root)


def _dockerd_alive(root: Path) -> bool:
    try:
        pid = int((root / "dockerd.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"dockerd" in cmdline and str(root).encode() in cmdline


def stale_dockerd_roots(tmp: Path = Path("/tmp")) -> list[Path]:
    """The tests' dockerd folders whose engine is gone: its pid file names no live dockerd of that folder,
    or it has had no pid file for an hour (an engine that is starting writes one within seconds)."""
    stale = []
    for root in tmp.glob(DOCKERD_PREFIX + "*"):
        with contextlib.suppress(OSError):
            if _dockerd_alive(root):
                continue
            if not (root / "dockerd.pid").exists() and time.time() - root.stat().st_mtime < STARTING_GRACE_S:
                continue
            stale.append(root)
    return stale


def agent_cgroup_tag(agent_home: Path | str) -> str:
    """The name of an agent's cgroups (agent/runtimes/cgroups.py: CgroupLayout.discover)."""
    return "dstack-" + hashlib.sha256(str(agent_home).encode()).hexdigest()[:12]


def agent_cgroup_parents(root: Path = ROOT) -> set[Path]:
    """Where agents started by this process make their groups: its own group in each hierarchy (v1), or in
    the unified one (v2), as the agent finds it (it inherits this process's groups)."""
    return set(_parents_by_controller(root).values())


def _parents_by_controller(root: Path = ROOT) -> dict[str, Path]:
    own = _own_groups()
    if is_unified(root):
        return {"pids": root / own.get("", "/").lstrip("/")}  # one folder: its pids.max seals the group
    return {ctrl: mount / own.get(ctrl, "/").lstrip("/") for ctrl, mount in _mounts().items()}


def _homes(homes_under: Path, depth: int) -> set[str]:
    """Every folder under `homes_under` (up to `depth` levels down): an agent's home may be any of them."""
    homes: set[str] = set()
    base = homes_under.resolve()
    for dirpath, dirnames, _ in os.walk(base):
        if len(Path(dirpath).relative_to(base).parts) >= depth:
            dirnames.clear()
        homes.add(dirpath)
    return homes


def kill_agent_leftovers(homes_under: Path, root: Path = ROOT, depth: int = 6) -> int:
    """SIGKILLs what the jobs of agents whose home is under `homes_under` left running (their agent was
    killed, so nothing else will): every process in those agents' job groups (sealed first, as the agent
    does: nothing forks meanwhile; also what left its session and cleared its environment), and every
    process whose environment names such a home (a job without cgroups). Returns how many were killed."""
    homes = _homes(homes_under, depth)
    tags = {agent_cgroup_tag(h) for h in homes}
    killed = 0
    for ctrl, parent in _parents_by_controller(root).items():
        for tag in tags:
            with contextlib.suppress(OSError):
                for job in [j for j in (parent / tag).iterdir() if j.is_dir()]:
                    killed += JobCgroup(job.name, {ctrl: job}, created=True).kill_all()
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if p.pid != os.getpid() and p.environ().get(AGENT_MARKER) in homes:
                os.kill(p.pid, signal.SIGKILL)
                killed += 1
    return killed


def remove_agent_cgroups(homes_under: Path, root: Path = ROOT, depth: int = 6) -> tuple[list[Path], list[Path]]:
    """Removes the cgroups of agents whose home is a folder under `homes_under` (up to `depth` levels down),
    in every hierarchy under `root`: their jobs' groups, then theirs. A group that still holds a process is
    left (kill_agent_leftovers first). Returns (removed, left)."""
    tags = {agent_cgroup_tag(h) for h in _homes(homes_under, depth)}
    removed: list[Path] = []
    left: list[Path] = []
    for group in sorted({p / tag for p in agent_cgroup_parents(root) for tag in tags}):
        if not group.is_dir():
            continue
        for job in [j for j in group.iterdir() if j.is_dir()]:
            (removed if _rmdir(job) else left).append(job)
        (removed if _rmdir(group) else left).append(group)
    return removed, left


def _rmdir(group: Path) -> bool:
    try:
        group.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
