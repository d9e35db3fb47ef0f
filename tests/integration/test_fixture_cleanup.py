"""The tests' own services leave nothing behind in the machine's shared places (tests/cleanup.py): the
dockerd fixture's mounts and folder, and the cgroups of agents killed with SIGKILL.

Each runs against the real thing: a real dockerd, real cgroupfs, a real process held in a group."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dstack.agent.runtimes.base import AGENT_MARKER
from dstack.agent.runtimes.cgroups import CgroupLayout
from tests.cleanup import (
    DOCKERD_PREFIX,
    STARTING_GRACE_S,
    agent_cgroup_tag,
    kill_agent_leftovers,
    mounts_under,
    remove_agent_cgroups,
    stale_dockerd_roots,
)
from tests.dockerd import BUSYBOX, Dockerd, DockerUnavailable

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounts and cgroups need root")


@root_only
def test_the_tests_dockerd_leaves_no_mount_and_no_folder() -> None:
    root = Path(tempfile.mkdtemp(prefix=DOCKERD_PREFIX, dir="/tmp"))
    d = Dockerd(root)
    try:
        d.start()
    except DockerUnavailable as e:
        d.remove()
        pytest.skip(str(e))
    try:
        # A container on the host's network (as the agent's docker runtime runs jobs) makes dockerd bind the
        # host's network namespace under its exec root. dockerd leaves that mount when it stops, and it
        # kept the folder from being removed: the fixture used to leave one behind per session.
        d.load_images()
        d.client().containers.run(BUSYBOX, "true", remove=True, network_mode="host")
        assert root / "exec" / "netns" / "default" in mounts_under(root)
        d.stop()
        assert root / "exec" / "netns" / "default" in mounts_under(root)
    finally:
        left = d.remove()
    assert left == [] and mounts_under(root) == []
    assert not root.exists()


def test_only_the_folders_of_engines_that_are_gone_are_swept(tmp_path: Path) -> None:
    def folder(name: str, pid: int | None = None, age_s: float = 0) -> Path:
        d = tmp_path / f"{DOCKERD_PREFIX}{name}"
        d.mkdir()
        if pid is not None:
            (d / "dockerd.pid").write_text(str(pid))
        os.utime(d, (time.time() - age_s, time.time() - age_s))
        return d

    dead = subprocess.Popen(["true"])
    dead.wait()
    other = subprocess.Popen(["sleep", "60"])  # alive, but no dockerd of that folder: a reused pid
    try:
        # A live engine of the folder: a process whose command line names dockerd and the folder.
        live_dir = tmp_path / f"{DOCKERD_PREFIX}live"
        fake = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)", "dockerd", "--exec-root", str(live_dir)]
        )
        # Popen returns once exec has begun; the kernel fills the new command line a moment later (a busy
        # machine showed the old one), and a real dockerd writes its pid file only after it is running.
        deadline = time.monotonic() + 30
        while b"dockerd" not in Path(f"/proc/{fake.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the stand-in engine never showed its command line"
            time.sleep(0.01)
        live = folder("live", fake.pid)
        stale = {folder("dead", dead.pid), folder("reused", other.pid), folder("old", None, STARTING_GRACE_S + 60)}
        starting = folder("starting")
        found = set(stale_dockerd_roots(tmp_path))
        assert found == stale and live not in found and starting not in found
    finally:
        for p in (other, fake):
            p.kill()
            p.wait()


def test_a_mount_point_with_spaces_is_read_from_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "48 27 0:4 net:[1] /tmp/dstack-dockerd-a\\040b/exec/netns/default rw - nsfs nsfs rw\n"
        "49 27 0:5 / /tmp/other rw - tmpfs tmpfs rw\n"
        "50 27 0:6 / /tmp/dstack-dockerd-a\\040b rw - tmpfs tmpfs rw\n"
    )
    assert mounts_under(Path("/tmp/dstack-dockerd-a b"), str(info)) == [
        Path("/tmp/dstack-dockerd-a b/exec/netns/default"),
        Path("/tmp/dstack-dockerd-a b"),
    ]


@root_only
def test_the_groups_of_a_killed_agent_go_and_no_one_elses(tmp_path: Path) -> None:
    """What a SIGKILLed agent leaves (its group and a job's, as CgroupLayout makes them) is removed for the
    homes under the session's folder; another agent's groups (a home elsewhere: another session) stay, and a
    group that still holds a process stays."""
    mine = tmp_path / "session" / "test0" / "agent-home"
    mine.mkdir(parents=True)
    elsewhere = Path(tempfile.mkdtemp(prefix="dstack-other-session-"))
    layouts = [CgroupLayout.discover(str(mine)), CgroupLayout.discover(str(elsewhere))]
    if not layouts[0].dirs:
        shutil.rmtree(elsewhere)
        pytest.skip("no writable cgroup hierarchy here")
    held = subprocess.Popen(["sleep", "60"])
    try:
        for layout in layouts:
            for d in layout.dirs.values():
                (d / "job-1").mkdir(exist_ok=True)
        busy = layouts[0].dirs["pids"] / "job-busy" if "pids" in layouts[0].dirs else None
        if busy is not None:
            busy.mkdir()
            (busy / "cgroup.procs").write_text(str(held.pid))
        removed, left = remove_agent_cgroups(tmp_path / "session")
        for d in layouts[0].dirs.values():
            assert d / "job-1" in removed and not (d / "job-1").exists()
        if busy is not None:
            assert left == [busy, busy.parent] and busy.exists()
        for d in layouts[1].dirs.values():
            assert (d / "job-1").exists() and agent_cgroup_tag(elsewhere) == d.name
    finally:
        held.send_signal(signal.SIGKILL)
        held.wait()
        remove_agent_cgroups(tmp_path / "session")
        for layout in layouts:
            for d in layout.dirs.values():
                if (d / "job-1").exists():
                    (d / "job-1").rmdir()
            layout.remove()
        shutil.rmtree(elsewhere)
    assert all(not d.exists() for layout in layouts for d in layout.dirs.values())


@root_only
def test_the_jobs_of_a_killed_agent_are_killed_and_its_groups_go_and_no_one_elses(tmp_path: Path) -> None:
    """A SIGKILLed agent's jobs run on in its job groups (tests/integration/test_run_loop.py's `sleep 600`
    held its pooled group for ten minutes, past the session's removal). The teardown kills them: one in a
    job group that cleared its environment (only the group names it), one outside any group that carries
    the agent's home; then the groups go. Another session's agent's job, in its group and with its home,
    runs on."""
    mine = tmp_path / "session" / "test0" / "agent-home"
    mine.mkdir(parents=True)
    elsewhere = Path(tempfile.mkdtemp(prefix="dstack-other-session-"))
    layouts = [CgroupLayout.discover(str(mine)), CgroupLayout.discover(str(elsewhere))]
    if "pids" not in layouts[0].dirs:
        shutil.rmtree(elsewhere)
        pytest.skip("no writable cgroup pids hierarchy here")

    def job(home: Path, group: Path | None, env: dict[str, str]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(["sleep", "600"], env={"PATH": os.environ["PATH"], **env}, start_new_session=True)
        if group is not None:
            group.mkdir(exist_ok=True)
            (group / "cgroup.procs").write_text(str(p.pid))
        return p

    in_group = job(mine, layouts[0].dirs["pids"] / "pool-0123", {})
    marked = job(mine, None, {AGENT_MARKER: str(mine)})
    theirs = job(elsewhere, layouts[1].dirs["pids"] / "pool-4567", {AGENT_MARKER: str(elsewhere)})
    try:
        assert kill_agent_leftovers(tmp_path / "session") >= 2
        assert in_group.wait(10) == -signal.SIGKILL and marked.wait(10) == -signal.SIGKILL
        assert theirs.poll() is None
        removed, left = remove_agent_cgroups(tmp_path / "session")
        assert left == [] and layouts[0].dirs["pids"] / "pool-0123" in removed
        assert all(not d.exists() for d in layouts[0].dirs.values())
        assert (layouts[1].dirs["pids"] / "pool-4567").exists()
    finally:
        for p in (in_group, marked, theirs):
            p.kill()
            p.wait()
        for layout in layouts:
            for d in layout.dirs.values():
                for g in [g for g in d.iterdir() if g.is_dir()] if d.exists() else []:
                    g.rmdir()
            layout.remove()
        shutil.rmtree(elsewhere)
