"""Slurm as the yardstick: a private single-node Slurm on this machine, trivial jobs through it.

Usage: python -m bench.slurm [JOBS] [--rounds R] [--latency N] [--cpus C] [--with-dstack [--agents A]]

Starts its own munged (own key and socket), slurmctld and slurmd from a slurm.conf generated in a temp
folder (own ports, state, spool, pid and log files; tuned for throughput: builtin scheduler with `defer`,
linuxproc process tracking, no task plugin, no accounting), then measures per round:
- throughput: JOBS `sbatch --wrap true` (16 submitters at once, as bench.e2e's 16 gRPC submitters) ->
  every job COMPLETED (squeue), jobs/s;
- sbatch -> start: one job at a time on the idle node, from just before `sbatch` to the job's own
  `$EPOCHREALTIME`; and `srun true` wall time (submit, run, exit).
With --with-dstack (or `python -m bench.e2e JOBS AGENTS --slurm`) dstack runs the same figures in the same
script, taking turns with Slurm round by round: bench.e2e's single-job runs (real agents, TLS), `dstack run`
of one job to its first line (`echo $EPOCHREALTIME`: to the job's start, and to the line at the client) and
`dstack run` of `true` attached to its exit (as `srun true`); then medians and dstack/Slurm ratios side by side.

Both systems stay up for the whole script; the idle one's CPU during the other's round is printed, so its
background cost is visible. The node offers CPUS job slots (default: as many as dstack's agents run at once,
64 each), over the real cores (SlurmdParameters=config_overrides), so both run the same number of jobs at once.
Needs slurm-wlm and munge: `scripts/bench-deps.sh` installs them (as root); this never installs anything.
Needs root (slurmd runs jobs as their submitter and as root here). Daemons left by a crashed run (folders
dstack-bench-slurm-<pid> whose pid is gone) are stopped and removed by the next.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

PREFIX = "dstack-bench-slurm-"
NODE = "bench"
DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order: the node first, munge last
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "sinfo")
# States a job leaves the queue in (squeue --states=all shows them until MinJobAge).
TERMINAL = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
        "REVOKED",
    }
)
SUBMITTERS = 16
BATCH = 100  # jobs per dstack run and per Slurm job array in the batched figure
# Tuned for short jobs (measured here, 22.05): batch_sched_delay=0, else a batch job waits its default 3 s
# to be launched (sbatch -> start 3.0 s, 1.0 s without it); sched_min_interval (microseconds) bounds how
# often an event-triggered pass may run; max_rpc_cnt yields to a burst of RPCs; no `defer` (with it, each
# `srun` waits for the next pass: 1 s instead of 50-150 ms, and no more jobs/s here).
SCHED_PARAMS = "batch_sched_delay=0,sched_min_interval=100000,max_rpc_cnt=64,default_queue_depth=1000"


class SlurmMissing(RuntimeError):
    pass


class SlurmFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class Layout:
    """Where one private Slurm keeps everything, and the ports it listens on."""

    root: Path
    ctld_port: int
    slurmd_port: int
    cpus: int
    memory_mib: int
    sched_params: str = SCHED_PARAMS
    hostname: str = field(default_factory=socket.gethostname)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    @property
    def munge_key(self) -> Path:
        return self.root / "munge" / "munge.key"

    def pid_file(self, daemon: str) -> Path:
        return self.root / f"{daemon}.pid"

    def log_file(self, daemon: str) -> Path:
        return self.root / f"{daemon}.log"

    @property
    def state_dir(self) -> Path:
        return self.root / "ctld-state"

    @property
    def spool_dir(self) -> Path:
        return self.root / "slurmd-spool"

    @property
    def env(self) -> dict[str, str]:
        """What Slurm's client commands need to reach this Slurm and not the system's."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}


def slurm_conf(layout: Layout) -> str:
    """slurm.conf for one node on loopback, tuned for throughput of short jobs (Slurm's high-throughput
    guide: defer scheduling to the periodic pass and batch it, no accounting or completion logging, short
    timeouts, little logging, linuxproc tracking with no cgroups)."""
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", "root")
    lines = {
        "ClusterName": "dstackbench",
        "SlurmctldHost": f"{layout.hostname}(127.0.0.1)",
        "SlurmctldPort": str(layout.ctld_port),
        "SlurmdPort": str(layout.slurmd_port),
        "SlurmUser": user,
        "SlurmdUser": "root",
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        "AuthInfo": f"socket={layout.munge_socket}",
        "StateSaveLocation": str(layout.state_dir),
        "SlurmdSpoolDir": str(layout.spool_dir),
        "SlurmctldPidFile": str(layout.pid_file("slurmctld")),
        "SlurmdPidFile": str(layout.pid_file("slurmd")),
        "SlurmctldLogFile": str(layout.log_file("slurmctld")),
        "SlurmdLogFile": str(layout.log_file("slurmd")),
        "SlurmctldDebug": "error",
        "SlurmdDebug": "error",
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_CPU",
        "SchedulerType": "sched/builtin",
        "SchedulerParameters": layout.sched_params,
        "MaxJobCount": "200000",
        "MinJobAge": "300",
        "MessageTimeout": "10",
        "SlurmctldTimeout": "30",
        "SlurmdTimeout": "60",
        "InactiveLimit": "0",
        "KillWait": "5",
        "Waittime": "0",
        "ReturnToService": "2",
        "MpiDefault": "none",
        "SwitchType": "switch/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none",
        "JobCompType": "jobcomp/none",
        "PrologFlags": "",
        # The node offers more job slots than cores, as a dstack agent runs up to --max-jobs at once.
        "SlurmdParameters": "config_overrides",
        "PlugStackConfig": str(layout.root / "plugstack.conf"),
    }
    out = [f"{k}={v}" for k, v in lines.items() if v]
    out.append(
        f"NodeName={NODE} NodeHostname={layout.hostname} NodeAddr=127.0.0.1 CPUs={layout.cpus} "
        f"RealMemory={layout.memory_mib} State=UNKNOWN"
    )
    out.append(f"PartitionName=bench Nodes={NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO")
    return "\n".join(out) + "\n"


def parse_conf(text: str) -> dict[str, str]:
    """slurm.conf's simple `Key=Value` lines (NodeName/PartitionName lines keyed by their first word)."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


def parse_sbatch(stdout: str) -> int:
    """The job id from `sbatch --parsable` (`<id>` or `<id>;<cluster>`)."""
    first = stdout.strip().split(";", 1)[0]
    if not first.isdigit():
        raise SlurmFailed(f"sbatch printed {stdout.strip()!r}, not a job id")
    return int(first)


def parse_squeue(stdout: str) -> dict[str, str]:
    """`squeue -h -r -t all -o '%i %T'` -> {job id: state}; an array's element is `<array id>_<index>`."""
    out: dict[str, str] = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and re.fullmatch(r"\d+(_\d+)?", parts[0]):
            out[parts[0]] = parts[1]
    return out


def expected_ids(submitted: Iterable[int], array: int) -> list[str]:
    """The squeue ids of what was submitted: each job, or each element of arrays of `array` jobs."""
    if array <= 1:
        return [str(i) for i in submitted]
    return [f"{i}_{k}" for i in submitted for k in range(array)]


def finished(states: dict[str, str], ids: Iterable[str]) -> tuple[int, Counter[str]]:
    """How many of ids are in a terminal state, and the count of each state among them."""
    done: Counter[str] = Counter()
    for i in ids:
        s = states.get(i)
        if s in TERMINAL:
            done[s] += 1
    return sum(done.values()), done


def parse_epoch(text: str) -> float:
    """The job's `$EPOCHREALTIME` (bash prints `1764500000.123456`; a locale may use a comma)."""
    m = re.search(r"(\d{9,})[.,](\d+)", text)
    if not m:
        raise SlurmFailed(f"no start time in {text!r}")
    return float(f"{m.group(1)}.{m.group(2)}")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]


def side_by_side(rows: list[tuple[str, str, list[float], list[float]]]) -> str:
    """A table of (figure, unit, dstack samples, slurm samples): medians and dstack/Slurm."""
    out = ["| figure | dstack (median) | Slurm (median) | dstack / Slurm |", "| --- | --- | --- | --- |"]
    for name, unit, d, s in rows:
        dm, sm = median(d), median(s)
        ratio = f"{dm / sm:.2f}x" if d and s and sm else "-"
        fmt = "{:,.1f} " + unit if unit == "jobs/s" else "{:,.0f} " + unit
        dv = fmt.format(dm) if d else "-"
        sv = fmt.format(sm) if s else "-"
        out.append(f"| {name} | {dv} | {sv} | {ratio} |")
    return "\n".join(out)


def missing_binaries(which: Callable[[str], str | None] = shutil.which) -> list[str]:
    return [b for b in BINARIES if which(b) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pid_alive_in(pid: int, root: Path) -> bool:
    """pid is alive and is one of this folder's daemons (not a pid reused by something else)."""
    try:
        p = psutil.Process(pid)
        return p.name() in DAEMONS and str(root) in " ".join(p.cmdline()) + p.environ().get("SLURM_CONF", "")
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _stop_pids(pids: list[int], timeout: float = 10) -> None:
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.terminate()
            procs.append(p)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=5)


def processes_of(conf: Path) -> dict[int, str]:
    """Every process of the Slurm with this slurm.conf, by its environment (pid -> name): the daemons (started
    with SLURM_CONF), slurmstepd (forked by slurmd, outlives it) and client commands (sbatch, squeue)."""
    out = {}
    for p in psutil.process_iter(["name"]):
        try:
            if p.environ().get("SLURM_CONF") == str(conf):
                out[p.pid] = str(p.info["name"])
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def stop_processes(conf: Path, known: dict[int, str]) -> None:
    """Stop this Slurm's processes (known: pid -> name, e.g. the daemons by their pid files, with those found
    by environment): slurmd first (it forks the steps), then steps and clients, then slurmctld (and its
    slurmscriptd), munged last, each while what it answers to is still there. Each stage looks again,
    as the stage before may have started a process on its way out."""
    daemons = {"slurmd", "slurmctld", "slurmscriptd", "munged"}
    known = dict(known)
    # Steps and clients get 2 s to go (a slurmstepd may ignore SIGTERM), the daemons longer to save state.
    for names, grace in (({"slurmd"}, 10), (None, 2), ({"slurmctld", "slurmscriptd"}, 10), ({"munged"}, 5)):
        procs = {**known, **processes_of(conf)}
        picked = [pid for pid, name in procs.items() if (name in names if names else name not in daemons)]
        _stop_pids(picked, grace)
        for pid in picked:  # stopped: its pid may be reused by the next stage's time
            known.pop(pid, None)


def _owner_alive(pid: int) -> bool:
    """The bench that made a folder still runs (a zombie, killed but not yet reaped, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def clean_stale(tmp: Path | None = None) -> list[Path]:
    """Stop the processes of folders left by a run that died (its pid in the folder's name is gone) and
    remove the folders."""
    base = Path(tmp or tempfile.gettempdir())
    removed = []
    for root in base.glob(f"{PREFIX}*"):
        m = re.fullmatch(re.escape(PREFIX) + r"(\d+)-.*", root.name)
        if not m or _owner_alive(int(m.group(1))):
            continue
        procs = processes_of(root / "slurm.conf")
        for daemon in DAEMONS:  # a daemon whose environment cannot be read, by its pid file
            try:
                pid = int((root / f"{daemon}.pid").read_text().strip())
            except (OSError, ValueError):
                continue
            if pid not in procs and _pid_alive_in(pid, root):
                procs[pid] = daemon
        stop_processes(root / "slurm.conf", procs)
        shutil.rmtree(root, ignore_errors=True)
        removed.append(root)
    return removed


class Slurm:
    """One private Slurm: munged, slurmctld and slurmd as children of this process."""

    def __init__(self, cpus: int, sched_params: str = SCHED_PARAMS) -> None:
        self.cpus = cpus
        self.keep = False
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
        memory_mib = int(psutil.virtual_memory().total / (1 << 20) * 0.9)
        self.layout = Layout(root, free_port(), free_port(), cpus, memory_mib, sched_params)

    def start(self) -> None:
        lay = self.layout
        (lay.root / "munge").mkdir(mode=0o700)
        lay.state_dir.mkdir()
        lay.spool_dir.mkdir()
        (lay.root / "jobs").mkdir()
        (lay.root / "plugstack.conf").write_text("")
        # munged refuses a key anyone else can read; 1 KiB of random bytes is its own default size.
        fd = os.open(lay.munge_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        lay.conf.write_text(slurm_conf(lay))
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={lay.munge_socket}",
                f"--key-file={lay.munge_key}",
                f"--pid-file={lay.pid_file('munged')}",
                f"--log-file={lay.log_file('munged')}",
                f"--seed-file={lay.root / 'munge' / 'seed'}",
                "--num-threads=4",
            ],
        )
        self._wait("munge socket", lambda: lay.munge_socket.exists(), 10)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(lay.conf)])
        self._wait("slurmctld", lambda: self._ok(["scontrol", "ping"], "UP"), 30)
        self._spawn("slurmd", ["slurmd", "-D", "-N", NODE, "-f", str(lay.conf)])
        self._wait("the node idle", lambda: self._ok(["sinfo", "-h", "-n", NODE, "-o", "%T"], "idle"), 60)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.layout.root / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=log, env=self.layout.env, start_new_session=True)

    def _ok(self, argv: list[str], want: str) -> bool:
        r = subprocess.run(argv, env=self.layout.env, capture_output=True, text=True)
        return r.returncode == 0 and want in r.stdout

    def _wait(self, what: str, cond: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            for name, p in self.procs.items():
                if p.poll() is not None:
                    self.keep = True  # the logs it names must outlive the clean-up
                    raise SlurmFailed(f"{name} exited with {p.returncode}; see {self.layout.root}/{name}.out/.log")
            if time.monotonic() > deadline:
                self.keep = True
                raise SlurmFailed(f"{what} not ready after {timeout:.0f} s; see the logs in {self.layout.root}")
            time.sleep(0.1)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values() if p.poll() is None]

    def stop(self) -> None:
        stop_processes(self.layout.conf, {p.pid: name for name, p in self.procs.items() if p.poll() is None})
        for p in self.procs.values():
            p.wait()
        self.procs.clear()

    def cleanup(self) -> None:
        """Stop the daemons; remove the folder unless keep is set (its logs are then left to read)."""
        self.stop()
        if not self.keep:
            shutil.rmtree(self.layout.root, ignore_errors=True)

    # -- measurements ------------------------------------------------------------------------------

    def sbatch(self, *args: str) -> int:
        r = subprocess.run(["sbatch", "--parsable", *args], env=self.layout.env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SlurmFailed(f"sbatch {' '.join(args)}: {r.stderr.strip()}")
        return parse_sbatch(r.stdout)

    def states(self) -> dict[str, str]:
        r = subprocess.run(
            ["squeue", "-h", "-r", "-t", "all", "-o", "%i %T"], env=self.layout.env, capture_output=True, text=True
        )
        if r.returncode != 0:
            raise SlurmFailed(f"squeue: {r.stderr.strip()}")
        return parse_squeue(r.stdout)

    def throughput(self, jobs: int, array: int = 1, timeout: float = 600) -> tuple[float, int, float]:
        """JOBS jobs of `true` (`sbatch --wrap true`, or arrays of ARRAY jobs: `sbatch --array`) from 16
        submitters -> every job in a terminal state: (jobs/s, jobs not COMPLETED, seconds to submit all)."""
        args = ["--wrap", "true", "-o", "/dev/null", "-J", "t"]
        if array > 1:
            args += [f"--array=0-{array - 1}"]
        pool = ThreadPoolExecutor(SUBMITTERS)
        t0 = time.monotonic()
        try:
            submitted_ids = list(pool.map(lambda _: self.sbatch(*args), range(jobs // array)))
        finally:
            # Interrupted (SIGTERM, Ctrl-C, a failed sbatch): drop the submissions not started yet.
            pool.shutdown(wait=True, cancel_futures=True)
        submitted = time.monotonic() - t0
        ids = expected_ids(submitted_ids, array)
        deadline = t0 + timeout
        while True:
            n, counts = finished(self.states(), ids)
            if n == len(ids):
                break
            if time.monotonic() > deadline:
                raise SlurmFailed(f"{len(ids) - n} of {len(ids)} jobs not finished after {timeout:.0f} s")
            time.sleep(0.1)
        wall = time.monotonic() - t0
        return len(ids) / wall, len(ids) - counts["COMPLETED"], submitted

    def submit_to_start(self) -> float:
        """One job on the idle node: just before `sbatch` -> the job's own $EPOCHREALTIME, in seconds."""
        out = self.layout.root / "jobs" / f"start-{time.monotonic_ns()}.out"
        t0 = time.time()
        self.sbatch("-o", str(out), "-J", "s", "--wrap", "exec bash -c 'echo $EPOCHREALTIME'")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                text = out.read_text()
            except FileNotFoundError:
                text = ""
            if text.strip():
                return parse_epoch(text) - t0
            time.sleep(0.005)
        raise SlurmFailed("a job did not start within 60 s")

    def srun_true(self) -> float:
        t0 = time.monotonic()
        r = subprocess.run(["srun", "-N1", "-n1", "true"], env=self.layout.env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SlurmFailed(f"srun true: {r.stderr.strip()}")
        return time.monotonic() - t0


def children_cpu() -> float:
    """CPU seconds of this process's finished children (the sbatch and squeue processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += sum(psutil.Process(pid).cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


@dataclass
class Figures:
    throughput: list[float] = field(default_factory=list)
    not_done: int = 0
    to_start: list[float] = field(default_factory=list)
    to_first_line: list[float] = field(default_factory=list)
    attached: list[float] = field(default_factory=list)
    idle_cpu: list[float] = field(default_factory=list)  # share of a core while the other one was measured


def require_slurm() -> None:
    missing = missing_binaries()
    if missing:
        raise SlurmMissing(
            f"Slurm is not installed here (missing {', '.join(missing)}). Install slurm-wlm and munge with "
            "`sudo scripts/bench-deps.sh` (apt-get; it starts no daemon the bench uses), then run again."
        )
    if os.geteuid() != 0:
        raise SlurmMissing("bench.slurm needs root: slurmd runs each job as its submitter and tracks it as root")


def start_slurm(cpus: int, sched_params: str = SCHED_PARAMS, keep: bool = False) -> Slurm:
    for root in clean_stale():
        print(f"removed a crashed run's Slurm in {root}", file=sys.stderr)
    slurm = Slurm(cpus, sched_params)
    slurm.keep = keep
    atexit.register(slurm.cleanup)
    # SIGTERM (and SIGHUP) end the bench through atexit too, so the daemons never outlive it.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(128 + 15))
    slurm.start()
    return slurm


def slurm_round(slurm: Slurm, figs: Figures, jobs: int, latency: int, batched: Figures | None = None) -> None:
    c0, clients0 = cpu_of(slurm.pids()), children_cpu()
    rate, bad, submitted = slurm.throughput(jobs)
    daemons_ms = (cpu_of(slurm.pids()) - c0) / jobs * 1e3
    clients_ms = (children_cpu() - clients0) / jobs * 1e3
    figs.throughput.append(rate)
    figs.not_done += bad
    print(
        f"  slurm: {jobs} x `sbatch --wrap true`: {rate:,.1f} jobs/s (submitted in {submitted:.2f} s,"
        f" {bad} not COMPLETED); CPU per job: munged + slurmctld + slurmd {daemons_ms:.2f} ms,"
        f" sbatch and squeue processes {clients_ms:.2f} ms (slurmstepd not counted)",
        flush=True,
    )
    if batched is not None:
        rate, bad, submitted = slurm.throughput(jobs, BATCH)
        batched.throughput.append(rate)
        batched.not_done += bad
        print(
            f"  slurm: {jobs // BATCH} x `sbatch --array=0-{BATCH - 1} --wrap true`: {rate:,.1f} jobs/s"
            f" (submitted in {submitted:.2f} s, {bad} not COMPLETED)",
            flush=True,
        )
    for _ in range(latency):
        figs.to_start.append(slurm.submit_to_start())
        figs.attached.append(slurm.srun_true())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jobs", type=int, nargs="?", default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--latency", type=int, default=10, help="sbatch->start and srun samples per round")
    p.add_argument("--with-dstack", action="store_true", help="dstack's bench.e2e figures in the same run")
    p.add_argument("--agents", type=int, default=2, help="dstack agents (with --with-dstack)")
    p.add_argument("--cpus", type=int, help="the node's job slots (default: 64 per dstack agent)")
    p.add_argument("--no-batched", action="store_true", help=f"no job arrays of {BATCH}, single jobs only")
    p.add_argument("--keep", action="store_true", help="keep the Slurm folder (logs) after the run")
    p.add_argument(
        "--sched-params", default=SCHED_PARAMS, help="slurm.conf's SchedulerParameters (default: %(default)s)"
    )
    a = p.parse_args(argv)
    try:
        require_slurm()
    except SlurmMissing as e:
        print(f"bench.slurm: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        run(a)
    except SlurmFailed as e:
        print(f"bench.slurm: Slurm failed: {e}", file=sys.stderr)
        sys.exit(1)


def run(a: argparse.Namespace) -> None:
    if a.with_dstack:
        from bench.e2e import compare_with_slurm

        compare_with_slurm(a.jobs, a.agents, a.rounds, a.latency, a.cpus, a.sched_params, not a.no_batched)
        return
    slurm = start_slurm(a.cpus or 64 * a.agents, a.sched_params, a.keep)
    try:
        print(f"Slurm {slurm_version()} in {slurm.layout.root}, node with {slurm.cpus} job slots; load {load()}")
        figs, batched = Figures(), Figures()
        for r in range(a.rounds):
            print(f"round {r + 1}/{a.rounds}")
            slurm_round(slurm, figs, a.jobs, a.latency, None if a.no_batched else batched)
        print(
            f"Slurm: {median(figs.throughput):,.1f} jobs/s (median of {a.rounds}),"
            f" {median(batched.throughput):,.1f} in arrays of {BATCH}; sbatch -> start p50 "
            f"{median(figs.to_start) * 1e3:,.0f} ms, p99 {p99(figs.to_start) * 1e3:,.0f} ms; srun true p50 "
            f"{median(figs.attached) * 1e3:,.0f} ms, p99 {p99(figs.attached) * 1e3:,.0f} ms; load {load()}"
        )
    finally:
        slurm.cleanup()


def slurm_version() -> str:
    r = subprocess.run(["slurmctld", "-V"], capture_output=True, text=True)
    return r.stdout.strip().removeprefix("slurm-wlm ").removeprefix("slurm ")


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
