"""bench/slurm.py without daemons: the slurm.conf it writes, what it reads back from Slurm's commands, and
the clean-up of a crashed run's folder (the daemons themselves run only in the bench)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bench import slurm
from bench.slurm import Layout, parse_conf, slurm_conf

REPO = Path(__file__).resolve().parents[2]


def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "s", ctld_port=17001, slurmd_port=17002, cpus=128, memory_mib=20000, hostname="box")


def test_conf_is_private_to_its_folder_and_ports(tmp_path: Path) -> None:
    lay = layout(tmp_path)
    conf = parse_conf(slurm_conf(lay))
    assert conf["SlurmctldPort"] == "17001" and conf["SlurmdPort"] == "17002"
    assert conf["SlurmctldHost"] == "box(127.0.0.1)"
    # Every file a daemon writes lies in the bench's own folder: nothing shared with a system Slurm.
    for key in ("StateSaveLocation", "SlurmdSpoolDir", "SlurmctldPidFile", "SlurmdPidFile", "SlurmctldLogFile"):
        assert Path(conf[key]).is_relative_to(lay.root), key
    assert conf["SlurmdLogFile"] == str(lay.log_file("slurmd"))
    assert conf["AuthInfo"] == f"socket={lay.munge_socket}"
    assert lay.munge_socket.is_relative_to(lay.root) and lay.munge_key.is_relative_to(lay.root)
    assert lay.env["SLURM_CONF"] == str(lay.conf)


def test_conf_is_tuned_for_short_jobs(tmp_path: Path) -> None:
    conf = parse_conf(slurm_conf(layout(tmp_path)))
    assert conf["ProctrackType"] == "proctrack/linuxproc"
    assert conf["TaskPlugin"] == "task/none"
    assert conf["SelectType"] == "select/cons_tres"
    assert conf["SchedulerType"] == "sched/builtin"
    assert conf["AccountingStorageType"] == "accounting_storage/none"
    assert conf["JobAcctGatherType"] == "jobacct_gather/none"
    assert "batch_sched_delay=0" in conf["SchedulerParameters"].split(",")
    assert int(conf["MaxJobCount"]) >= 100_000
    # The node advertises the asked job slots over the real cores, which slurmd allows only with this.
    assert "config_overrides" in conf["SlurmdParameters"]
    assert conf["NodeName"].startswith("bench ") and " CPUs=128 " in conf["NodeName"]
    assert "RealMemory=20000" in conf["NodeName"]
    assert conf["PartitionName"].startswith("bench Nodes=bench Default=YES")
    assert "PrologFlags" not in conf  # empty values are left out, not written as `Key=`


def test_sched_params_can_be_changed(tmp_path: Path) -> None:
    lay = Layout(tmp_path, 1, 2, 2, 1000, "defer", "box")
    assert parse_conf(slurm_conf(lay))["SchedulerParameters"] == "defer"


def test_parse_sbatch() -> None:
    assert slurm.parse_sbatch("42\n") == 42
    assert slurm.parse_sbatch("42;dstackbench\n") == 42
    with pytest.raises(slurm.SlurmFailed, match="not a job id"):
        slurm.parse_sbatch("sbatch: error: Batch job submission failed\n")


def test_parse_squeue_and_finished() -> None:
    states = slurm.parse_squeue("1 COMPLETED\n2 RUNNING\n3 FAILED\n 4 PENDING\nJOBID STATE\n\n5 COMPLETED\n")
    assert states == {"1": "COMPLETED", "2": "RUNNING", "3": "FAILED", "4": "PENDING", "5": "COMPLETED"}
    n, counts = slurm.finished(states, slurm.expected_ids([1, 2, 3, 4, 5, 6], 1))
    assert n == 3 and counts == Counter({"COMPLETED": 2, "FAILED": 1})  # 6: not listed (yet) is not finished


def test_array_elements_are_counted_one_by_one() -> None:
    # squeue -r lists each element; a pending range (`7_[2-3]`, without -r) is no element and not counted.
    states = slurm.parse_squeue("7_0 COMPLETED\n7_1 COMPLETED\n7_[2-3] PENDING\n8_0 OUT_OF_MEMORY\n")
    assert set(states) == {"7_0", "7_1", "8_0"}
    ids = slurm.expected_ids([7, 8], 4)
    assert ids[:5] == ["7_0", "7_1", "7_2", "7_3", "8_0"] and len(ids) == 8
    n, counts = slurm.finished(states, ids)
    assert n == 3 and counts["COMPLETED"] == 2


def test_parse_epoch() -> None:
    assert slurm.parse_epoch("1764500000.123456\n") == pytest.approx(1764500000.123456)
    assert slurm.parse_epoch("started 1764500000,5\n") == pytest.approx(1764500000.5)  # a comma locale
    with pytest.raises(slurm.SlurmFailed):
        slurm.parse_epoch("\n")


def test_side_by_side_medians_and_ratio() -> None:
    table = slurm.side_by_side(
        [("rate", "jobs/s", [100.0, 300.0, 200.0], [40.0, 35.0, 45.0]), ("lat", "ms", [500.0], []), ("x", "ms", [], [])]
    )
    rows = table.splitlines()
    assert rows[2] == "| rate | 200.0 jobs/s | 40.0 jobs/s | 5.00x |"
    assert rows[3] == "| lat | 500 ms | - | - |"
    assert rows[4] == "| x | - | - | - |"
    assert slurm.p99([3.0, 1.0, 2.0]) == 3.0 and slurm.median([]) != slurm.median([])  # nan


def test_missing_binaries() -> None:
    assert slurm.missing_binaries(lambda b: None if b in ("munged", "srun") else f"/usr/bin/{b}") == ["munged", "srun"]


def test_stale_folder_removed_without_killing_an_unrelated_process(tmp_path: Path) -> None:
    """A crashed run's folder whose pid files name live processes that are not its daemons (pids reused):
    the folder goes, the processes stay; a live run's folder is kept."""
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f"{slurm.PREFIX}{dead.pid}-abc"
        stale.mkdir()
        for daemon in slurm.DAEMONS:
            (stale / f"{daemon}.pid").write_text(f"{bystander.pid}\n")
        (stale / "slurmd.pid").write_text("not a pid")
        live = tmp_path / f"{slurm.PREFIX}{os.getpid()}-def"
        live.mkdir()
        other = tmp_path / "dstack-bench-slurm-x"  # not one of ours by name: left alone
        other.mkdir()
        assert slurm.clean_stale(tmp_path) == [stale]
        assert not stale.exists() and live.exists() and other.exists()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("module", ["bench.slurm", "bench.e2e"])
def test_without_slurm_says_how_to_install_and_exits_2(module: str, tmp_path: Path) -> None:
    args = ["--slurm"] if module == "bench.e2e" else []
    env = {**os.environ, "PATH": str(tmp_path)}  # no slurm, no munge on PATH
    r = subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "scripts/bench-deps.sh" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="bench.slurm runs as root only")
def test_a_daemon_that_fails_to_start_is_named_and_its_logs_kept(tmp_path: Path) -> None:
    """Fake Slurm binaries whose munged refuses to start: a one-line error naming it and the folder of its log,
    exit 1, no traceback; the folder is kept for that log and nothing is left running."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in slurm.BINARIES:
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "munged").write_text("#!/bin/sh\necho 'munged: Error: Keyfile is insecure' >&2\nexit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "TMPDIR": str(tmp)}
    r = subprocess.run(
        [sys.executable, "-m", "bench.slurm", "10"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "munged exited with 1" in r.stderr and "Traceback" not in r.stderr
    (kept,) = tmp.iterdir()
    assert kept.name.startswith(slurm.PREFIX)
    assert "Keyfile is insecure" in (kept / "munged.out").read_text()
