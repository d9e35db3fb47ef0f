"""The cgroup v2 path of agent/runtimes/cgroups.py, against a folder that mimics cgroupfs.

Few CI hosts can delegate cgroup v2 controllers to a test (this one mounts the controllers on v1
hierarchies and leaves the unified one without controllers), so the v2 path runs here against a
temporary folder laid out like /sys/fs/cgroup: `cgroup.controllers` at the root makes it the unified
layout, and the files the kernel would create (cgroup.procs, pids.events, memory.events) are written
by the test. What it checks is what the agent writes and reads there: the controllers turned on down
the agent's subtree, the agent moved into a leaf first, the limits, joining, killing, OOM and the
pids limit hits. The v1 path, pids included, runs for real in tests/integration/test_limits.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import subprocess
import threading
from pathlib import Path

import pytest

from dstack.agent.runtimes.cgroups import (
    POOL_MAX,
    POOL_PREFIX,
    V2_AGENT_LEAF,
    CgroupLayout,
    JobCgroup,
    _warned,
    host_pids_budget,
    is_unified,
    pids_events_of,
    pids_limit_hits,
    pids_limit_line,
)

AGENT_GROUP = "system.slice/dstack-agent.service"


def fake_cgroupfs(tmp: Path, controllers: str = "cpuset cpu io memory hugetlb pids rdma misc") -> tuple[Path, Path]:
    """A unified hierarchy at tmp/cgroup with the agent in AGENT_GROUP; returns (root, proc_cgroup)."""
    root = tmp / "cgroup"
    own = root / AGENT_GROUP
    own.mkdir(parents=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (own / "cgroup.controllers").write_text(controllers + "\n")
    (own / "cgroup.procs").write_text("4242\n")
    (own / "cgroup.type").write_text("domain\n")  # every group but the host's root has one
    (own / "cgroup.subtree_control").write_text("")
    proc_cgroup = tmp / "proc-self-cgroup"
    proc_cgroup.write_text(f"0::/{AGENT_GROUP}\n")
    return root, proc_cgroup


def empty_fake_group(folder: Path) -> None:
    """The kernel drops a group's interface files with its folder; the fake's go by hand, so rmdir works."""
    for f in folder.iterdir():
        f.unlink()


def discover(tmp: Path, root: Path, proc_cgroup: Path) -> CgroupLayout:
    return CgroupLayout.discover("/agent-home", root, str(tmp / "no-mountinfo"), str(proc_cgroup))


def test_v2_layout_delegates_controllers_down_the_agents_subtree(tmp_path: Path) -> None:
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    assert is_unified(root) and not is_unified(tmp_path)
    layout = discover(tmp_path, root, proc_cgroup)
    own = root / AGENT_GROUP
    assert layout.v2
    parent = layout.dirs["memory"]
    assert layout.dirs == {"memory": parent, "cpu": parent, "pids": parent}
    assert parent.parent == own and parent.name.startswith("dstack-")
    # "No internal processes": the agent (this process) left its group for a leaf before the group delegated.
    assert (own / V2_AGENT_LEAF / "cgroup.procs").read_text() == str(os.getpid())
    assert (own / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert (parent / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"


def test_v2_job_gets_memory_cpu_pids_limits_and_its_shell_joins(tmp_path: Path) -> None:
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    cg = discover(tmp_path, root, proc_cgroup).job("job1", 64 << 20, 0.5, 4096)
    assert cg.create() == []
    group = cg.paths["pids"]
    assert set(cg.paths.values()) == {group} and group.name == "job1"
    assert (group / "memory.max").read_text() == str(64 << 20)
    assert (group / "memory.swap.max").read_text() == "0"
    assert (group / "cpu.max").read_text() == "50000 100000"
    assert (group / "pids.max").read_text() == "4096"
    # One group in v2: the shell writes itself into its cgroup.procs once.
    assert cg.join_script() == f"echo $$ > {group / 'cgroup.procs'} 2>/dev/null || true\n"
    subprocess.run(["bash", "-c", cg.join_script()], check=True)
    assert cg.pids()  # the shell's pid, as the kernel would list it


def test_v2_unlimited_job_writes_no_limit(tmp_path: Path) -> None:
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    cg = discover(tmp_path, root, proc_cgroup).job("job2", 0, 0.0, 0)
    assert cg.create() == []
    assert not any((cg.paths["pids"] / f).exists() for f in ("memory.max", "cpu.max", "pids.max"))
    assert cg.joined  # still one group for the job: it is killed as a whole at the end


def test_v2_oom_and_pids_limit_are_read_from_the_event_files(tmp_path: Path) -> None:
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    cg = discover(tmp_path, root, proc_cgroup).job("job3", 32 << 20, 0.0, 64)
    cg.create()
    group = cg.paths["memory"]
    assert not cg.oom_killed() and cg.pids_limit_hits() == 0
    (group / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n")
    (group / "pids.events").write_text("max 37\n")
    assert cg.oom_killed()
    assert cg.pids_limit_hits() == 37
    assert pids_limit_line(64, 37) == (
        "dstack: the job hit its pids limit (64): fork failed 37 time(s)"
        " (processes and threads count; the agent's --pids-limit sets it)"
    )


def test_v2_kill_uses_cgroup_kill_then_kills_what_is_listed(tmp_path: Path) -> None:
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    cg = discover(tmp_path, root, proc_cgroup).job("job4", 0, 0.0, 64)
    cg.create()
    group = cg.paths["pids"]
    (group / "cgroup.kill").write_text("0")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        # cgroup.kill does nothing in a fake folder: the fallback kills each pid still listed. The
        # fake lists the pid until the test empties it, as the kernel would once the process is gone.
        (group / "cgroup.procs").write_text(f"{sleeper.pid}\n")
        killer = threading.Thread(target=cg.kill_all)
        killer.start()
        assert sleeper.wait(10) == -9
        (group / "cgroup.procs").write_text("")
        killer.join(10)
        assert not killer.is_alive()
    finally:
        sleeper.kill()
    assert (group / "cgroup.kill").read_text() == "1"
    empty_fake_group(group)
    cg.remove()
    assert not group.exists()


def test_v2_leftovers_of_a_previous_agent_run_are_found(tmp_path: Path) -> None:
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    layout = discover(tmp_path, root, proc_cgroup)
    layout.job("old-job", 64 << 20, 0.0, 64).create()  # a job with a memory limit: its group has its id
    pooled = layout.job("other-job", 0, 0.0, 64)  # one without: a reusable group, named pool-*
    pooled.create()
    left = {cg.job_id: cg for cg in layout.leftovers()}
    assert set(left) == {"old-job", pooled.paths["pids"].name}
    old = left["old-job"]
    assert old.v2 and old.joined == [old.paths["pids"] / "cgroup.procs"]


def test_v2_without_delegated_controllers_runs_without_limits(tmp_path: Path) -> None:
    root, proc_cgroup = fake_cgroupfs(tmp_path, controllers="")
    layout = discover(tmp_path, root, proc_cgroup)
    assert layout.v2 and layout.dirs == {}
    cg = layout.job("job5", 64 << 20, 1.0, 64)
    assert cg.create() == ["memory", "cpu", "pids"]
    assert cg.join_script() == "" and cg.pids() == set()


def test_v2_only_the_delegated_controllers_are_enabled(tmp_path: Path) -> None:
    root, proc_cgroup = fake_cgroupfs(tmp_path, controllers="cpu pids")
    layout = discover(tmp_path, root, proc_cgroup)
    assert set(layout.dirs) == {"cpu", "pids"}
    assert (root / AGENT_GROUP / "cgroup.subtree_control").read_text() == "+cpu +pids"
    assert layout.job("job6", 64 << 20, 1.0, 64).create() == ["memory"]


def test_v2_agent_in_the_hosts_root_group_moves_nowhere(tmp_path: Path) -> None:
    """The host's root group may delegate while it holds processes (and holds every unplaced one)."""
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    proc_cgroup.write_text("0::/\n")
    (root / "cgroup.procs").write_text("1\n")
    layout = discover(tmp_path, root, proc_cgroup)
    assert layout.dirs["pids"].parent == root
    assert not (root / V2_AGENT_LEAF).exists()


def test_v2_agent_at_a_containers_namespace_root_moves_into_a_leaf(tmp_path: Path) -> None:
    """With its own cgroup namespace the agent sees its group as `/`, which is no real root: it must move."""
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    proc_cgroup.write_text("0::/\n")
    (root / "cgroup.procs").write_text("1\n")
    (root / "cgroup.type").write_text("domain\n")
    layout = discover(tmp_path, root, proc_cgroup)
    assert layout.dirs["pids"].parent == root
    assert (root / V2_AGENT_LEAF / "cgroup.procs").read_text() == str(os.getpid())


def test_pids_events_of_a_process_in_either_layout(tmp_path: Path) -> None:
    root, _ = fake_cgroupfs(tmp_path)
    proc = tmp_path / "proc"
    (proc / "77").mkdir(parents=True)
    (proc / "77" / "cgroup").write_text("0::/docker/abc\n")
    assert pids_events_of(77, "abc", root, proc) == root / "docker/abc/pids.events"
    # A pid that is not the container's here (another pid namespace, a remote engine): nothing is read.
    assert pids_events_of(77, "def", root, proc) is None
    # v1: the pids hierarchy's mount point, from mountinfo, and the process's group in it.
    v1root = tmp_path / "v1"
    v1root.mkdir()
    (proc / "self").mkdir()
    (proc / "self" / "mountinfo").write_text("39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n")
    (proc / "77" / "cgroup").write_text("8:pids:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    assert pids_events_of(77, "abc", v1root, proc) == Path("/sys/fs/cgroup/pids/docker/abc/pids.events")
    (proc / "77" / "cgroup").write_text("8:pids:/system.slice/docker-abc.scope\n0::/\n")  # the systemd driver
    assert pids_events_of(77, "abc", v1root, proc) == Path(
        "/sys/fs/cgroup/pids/system.slice/docker-abc.scope/pids.events"
    )
    (tmp_path / "ev").write_text("max 0\n")
    assert pids_limit_hits(tmp_path / "ev") == 0
    assert pids_limit_hits(tmp_path / "missing") == 0


def test_all_jobs_together_are_bounded_below_the_hosts_pid_space(tmp_path: Path) -> None:
    """One fork bomb per job, each at its own limit, must still leave the host pids to run on."""
    kernel = tmp_path / "kernel"
    kernel.mkdir()
    (kernel / "pid_max").write_text("32768\n")
    (kernel / "threads-max").write_text("192731\n")
    assert host_pids_budget(kernel) == 24576
    (kernel / "threads-max").write_text("8000\n")
    assert host_pids_budget(kernel) == 6000
    assert host_pids_budget(tmp_path / "none") == 0
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    layout = discover(tmp_path, root, proc_cgroup)
    layout.limit_all_jobs(24576)
    assert (layout.dirs["pids"] / "pids.max").read_text() == "24576"


def test_a_stopping_agent_removes_its_empty_parent_groups(tmp_path: Path) -> None:
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    layout = discover(tmp_path, root, proc_cgroup)
    parent = layout.dirs["pids"]
    (parent / "cgroup.subtree_control").unlink()  # the kernel drops interface files with the folder
    left = parent / "job-left"
    left.mkdir()
    layout.remove()
    assert parent.exists()  # a job's group is still there: kept for the next start to clean up
    left.rmdir()
    layout.remove()
    assert not parent.exists()


def test_v2_refused_delegation_runs_jobs_without_limits(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Started from a login shell, the agent's group holds the session's processes too: the kernel refuses
    the controllers (EBUSY; here a write that fails), and jobs run unlimited with a warning saying why."""
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    subtree = root / AGENT_GROUP / "cgroup.subtree_control"
    subtree.unlink()
    subtree.mkdir()  # writing it fails, as the kernel's EBUSY would
    _warned.discard("v2")
    with caplog.at_level(logging.WARNING, logger="dstack.agent"):
        layout = discover(tmp_path, root, proc_cgroup)
    assert layout.v2 and layout.dirs == {}
    assert "needs a cgroup of its own (systemd: a service with Delegate=yes" in caplog.text
    assert layout.job("j", 64 << 20, 1.0, 64).create() == ["memory", "cpu", "pids"]


def test_v2_close_at_once_reads_an_empty_group_without_sealing_it(tmp_path: Path) -> None:
    # The common end of a job: its group is empty once its main process is gone. The result comes on
    # the caller's thread, and nothing is written (no pids.max 0, no cgroup.kill): nothing is left to stop.
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    cg = discover(tmp_path, root, proc_cgroup).job("job5", 0, 0.0, 64)
    cg.create()
    group = cg.paths["pids"]
    (group / "cgroup.procs").write_text("")
    (group / "pids.events").write_text("max 3\n")
    assert cg.close_at_once() == (False, 3)
    assert (group / "pids.max").read_text() == "64"
    assert not (group / "cgroup.kill").exists()


def test_v2_close_at_once_seals_and_kills_what_is_left_then_hands_over(tmp_path: Path) -> None:
    # A process left in the group (it left the job's session): the group is sealed, the process killed,
    # and None says "finish on a worker thread" (close() waits until the group is empty).
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    cg = discover(tmp_path, root, proc_cgroup).job("job6", 0, 0.0, 64)
    cg.create()
    group = cg.paths["pids"]
    (group / "pids.events").write_text("max 2\n")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (group / "cgroup.procs").write_text(f"{sleeper.pid}\n")
        assert cg.close_at_once() is None
        assert sleeper.wait(10) == -9
        assert (group / "pids.max").read_text() == "0"
        (group / "pids.events").write_text("max 9\n")  # forks refused after the seal are not the job's
        (group / "cgroup.procs").write_text("")
        assert cg.close() == (False, 2)
    finally:
        sleeper.kill()


# ---- the pool of reusable job groups (CgroupLayout.job / give_back) --------------------------------------


def finished_clean(cg: JobCgroup) -> None:
    """What the kernel shows once a job's last process is gone and reaped, and the job's close saw it."""
    group = cg.paths["pids"]
    (group / "cgroup.procs").write_text("")
    (group / "pids.current").write_text("0\n")
    (group / "pids.events").write_text("max 0\n")
    assert cg.close_at_once() == (False, 0)


def test_a_clean_jobs_group_is_reused_by_the_next_job_as_it_is(tmp_path: Path) -> None:
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    layout = discover(tmp_path, root, proc_cgroup)
    first = layout.job("job1", 0, 0.0, 64)
    assert first.create() == []
    group = first.paths["pids"]
    assert group.name.startswith(POOL_PREFIX)  # never a job's id: a job's next attempt cannot share it
    finished_clean(first)
    assert layout.give_back(first)
    (group / "pids.max").write_text("64")
    second = layout.job("job2", 0, 0.0, 64)
    assert second is first and second.job_id == "job2" and second.paths["pids"] == group
    assert second.create() == []  # no mkdir, no limit written: the group is as the first job left it
    assert second.pids_limit_hits() == 0 and not second.oom_killed()


def test_a_group_with_a_task_left_is_not_reused(tmp_path: Path) -> None:
    # A zombie not yet reaped still counts in pids.current (and in the job's limit): the group is removed.
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    layout = discover(tmp_path, root, proc_cgroup)
    cg = layout.job("job1", 0, 0.0, 64)
    cg.create()
    finished_clean(cg)
    (cg.paths["pids"] / "pids.current").write_text("1\n")
    assert not layout.give_back(cg) and not layout.pool
    (cg.paths["pids"] / "pids.current").unlink()  # unreadable: not reused either
    assert not layout.give_back(cg) and not layout.pool


def test_a_group_that_was_sealed_hit_its_limit_or_saw_an_oom_kill_is_not_reused(tmp_path: Path) -> None:
    # Its counters would be the next job's (a pids limit hit or an OOM kill it never had), and a sealed
    # group's pids.max is 0: it goes, and the next job gets a new one.
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    layout = discover(tmp_path, root, proc_cgroup)
    hit = layout.job("job1", 0, 0.0, 64)
    hit.create()
    finished_clean(hit)
    (hit.paths["pids"] / "pids.events").write_text("max 5\n")
    assert hit.close_at_once() == (False, 5)
    assert not layout.give_back(hit)
    oom = layout.job("job2", 0, 0.0, 64)
    oom.create()
    finished_clean(oom)
    (oom.paths["memory"] / "memory.events").write_text("oom_kill 1\n")
    assert oom.close_at_once() == (True, 0)
    assert not layout.give_back(oom)
    stopped = layout.job("job3", 0, 0.0, 64)
    stopped.create()
    finished_clean(stopped)
    stopped.kill_all()  # `dstack stop`: the group was sealed (pids.max 0) after its close saw it clean
    assert (stopped.paths["pids"] / "pids.max").read_text() == "0"
    assert not layout.give_back(stopped) and not layout.pool
    being_stopped = layout.job("job5", 0, 0.0, 64)
    being_stopped.create()
    finished_clean(being_stopped)
    being_stopped.stopping = True  # a stop under way: its kill_all may seal the group at any moment
    assert not layout.give_back(being_stopped) and not layout.pool
    never_closed = layout.job("job4", 0, 0.0, 64)
    never_closed.create()
    assert not layout.give_back(never_closed)


def test_a_pooled_group_with_a_process_in_it_is_never_handed_to_a_job(tmp_path: Path) -> None:
    # The attack: a process put into an idle pooled group (only a job running as the agent's own user could)
    # would run on in the next job's group, counted in its limit and outside any job of its own.
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    layout = discover(tmp_path, root, proc_cgroup)
    cg = layout.job("job1", 0, 0.0, 64)
    cg.create()
    finished_clean(cg)
    assert layout.give_back(cg)
    (cg.paths["pids"] / "cgroup.procs").write_text("31337\n")
    fresh = layout.job("job2", 0, 0.0, 64)
    assert fresh is not cg and fresh.paths["pids"] != cg.paths["pids"] and not fresh.created
    assert layout.take_discarded() == [cg] and layout.take_discarded() == []


def test_jobs_with_memory_or_cpu_limits_get_groups_of_their_own(tmp_path: Path) -> None:
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    layout = discover(tmp_path, root, proc_cgroup)
    for i, (memory, cpu) in enumerate([(64 << 20, 0.0), (0, 0.5)]):
        cg = layout.job(f"limited{i}", memory, cpu, 64)
        cg.create()
        assert cg.paths["pids"].name == f"limited{i}"
        finished_clean(cg)
        assert not layout.give_back(cg)


def test_the_pool_is_bounded_and_removed_with_the_layout(tmp_path: Path) -> None:
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    layout = discover(tmp_path, root, proc_cgroup)
    groups = [layout.job(f"job{i}", 0, 0.0, 64) for i in range(POOL_MAX + 1)]
    for cg in groups:
        cg.create()
        finished_clean(cg)
    assert [layout.give_back(cg) for cg in groups] == [True] * POOL_MAX + [False]
    for cg in groups:
        empty_fake_group(cg.paths["pids"])
    layout.remove()
    assert not layout.pool and not any(cg.paths["pids"].exists() for cg in groups[:POOL_MAX])


def folder_fds(folder: Path) -> list[int]:
    """This process's fds that are handles of the folder."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}").removesuffix(" (deleted)") == str(folder):
                out.append(int(name))
    return out


def test_a_groups_files_are_opened_through_one_close_on_exec_folder_fd_closed_with_the_group(tmp_path: Path) -> None:
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    cg = discover(tmp_path, root, proc_cgroup).job("job-fd", 0, 0.0, 64)
    cg.create()
    group = cg.paths["pids"]
    (group / "pids.current").write_text("0\n")
    (group / "pids.events").write_text("max 0\n")
    cg.join(os.getpid())
    assert cg.pids() == {os.getpid()} and not cg.tasks_left() and cg.pids_limit_hits() == 0
    (fd,) = folder_fds(group)  # one handle, kept for all the group's files
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC, "a job must never inherit the agent's handle"
    empty_fake_group(group)
    cg.remove()
    assert not group.exists() and folder_fds(group) == []
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_removed_groups_freed_fd_number_taken_by_another_folder_is_never_written(tmp_path: Path) -> None:
    # The attack: once a group's folder fd is closed, the next open takes its number. A late user of the
    # removed group (a stop's kill_all on a worker thread) must not write pids.max 0 or cgroup.kill there.
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    cg = discover(tmp_path, root, proc_cgroup).job("job-late", 0, 0.0, 64)
    cg.create()
    group = cg.paths["pids"]
    (fd,) = folder_fds(group)
    empty_fake_group(group)
    cg.remove()
    decoy = tmp_path / "another-group"
    decoy.mkdir()
    (decoy / "cgroup.kill").write_text("")
    taken = os.open(decoy, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        assert taken == fd, "the lowest free number: the one the group's fd had"
        cg.kill_all()
        cg.join(os.getpid())
        assert sorted(p.name for p in decoy.iterdir()) == ["cgroup.kill"]
        assert (decoy / "cgroup.kill").read_text() == ""
    finally:
        os.close(taken)


def test_a_group_dropped_without_remove_closes_its_folder_fd(tmp_path: Path) -> None:
    root, proc_cgroup = fake_cgroupfs(tmp_path)
    cg = discover(tmp_path, root, proc_cgroup).job("job-dropped", 0, 0.0, 64)
    cg.create()
    group = cg.paths["pids"]
    assert len(folder_fds(group)) == 1
    del cg
    gc.collect()
    assert folder_fds(group) == []
