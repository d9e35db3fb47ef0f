"""The run loop end to end: real coordinator and agent processes on loopback, the real CLI."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import Cluster, search, sigint_as_from_a_terminal, wait_for, write_project

pytestmark = pytest.mark.integration

LINES = 200_000


def submit(cluster: Cluster, project: Path, workflow: str, *args: str) -> str:
    r = cluster.cli("run", "-d", workflow, *args, cwd=project)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def start_long_job(cluster: Cluster, tmp_path: Path) -> str:
    """Submits a job that runs for ten minutes and returns its run's name once the job has started."""
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: long
            provider: bash
            commands: ["echo started", "sleep 600"]
        """,
    )
    name = submit(cluster, project, "long")
    wait_for(lambda: "started" in cluster.cli("logs", name).stdout, what="the job to start")
    return name


def test_200k_lines_arrive_complete_and_in_order(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    project = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: many
            provider: bash
            commands: ["seq 1 {LINES}", "echo done >&2"]
        """,
    )
    r = cluster.cli("run", "many", cwd=project)
    assert r.returncode == 0, r.stderr[-2000:]
    name = search(r"(\S+) submitted", r.stderr).group(1)
    expected = [str(i) for i in range(1, LINES + 1)] + ["done"]
    assert r.stdout.splitlines() == expected
    # and again from storage, in a separate invocation
    logs = cluster.cli("logs", name)
    assert logs.returncode == 0
    assert logs.stdout.splitlines() == expected


def test_stop_kills_the_whole_process_tree(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: tree
            provider: bash
            commands:
              - sleep 1000 &
              - echo "child $!"
              - setsid sleep 1001 &
              - echo "escaped $!"
              - trap '' TERM
              - wait
        """,
    )
    name = submit(cluster, project, "tree")

    def pids() -> list[int]:
        out = cluster.cli("logs", name).stdout
        return [int(x) for x in re.findall(r"(?:child|escaped) (\d+)", out)]

    found = wait_for(lambda: p if len(p := pids()) == 2 else None, what="the job's children to start")
    assert all(psutil.pid_exists(p) for p in found)
    r = cluster.cli("stop", name)
    assert r.returncode == 0, r.stderr
    run = cluster.wait_status(name, {"stopped"}, timeout=30)
    assert run["termination_reason"] == "stopped by user"

    def gone() -> bool:
        return not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in found)

    wait_for(gone, timeout=10, what="every process of the job to be killed")


def test_coordinator_kill9_and_restart_loses_nothing(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    agent = cluster.start_agent()
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: slow
            provider: bash
            commands:
              - for i in $(seq 1 40); do echo "line $i"; sleep 0.1; done
              - mkdir -p out && echo result > out/r.txt
            artifacts: [out]
        """,
    )
    name = submit(cluster, project, "slow")
    wait_for(lambda: "line 5" in cluster.cli("logs", name).stdout, what="the job to print")
    assert cluster.coordinator is not None

    def sessions_lost() -> int:
        return len(re.findall(r"session with the coordinator (?:ended|failed)", agent.output()))

    lost = sessions_lost()
    cluster.coordinator.kill9()
    # The job keeps running and printing while the coordinator is down: restarted only once the agent has
    # logged losing its session, so that the job's lines wait in its outbox meanwhile.
    wait_for(lambda: sessions_lost() > lost, what="the agent to lose the coordinator")
    cluster.start_coordinator()
    run = cluster.wait_status(name, {"done", "failed"}, timeout=60)
    assert run["status"] == "done", run
    out = cluster.cli("logs", name).stdout.splitlines()
    assert out == [f"line {i}" for i in range(1, 41)]
    arts = cluster.cli("artifacts", "list", name, "--json")
    assert '"out/r.txt"' in arts.stdout
    # and the pool still works after the restart
    assert cluster.cli("run", "slow", cwd=project).returncode == 0


def test_agent_kill9_fails_its_job_with_agent_lost(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    agent = cluster.start_agent()
    name = start_long_job(cluster, tmp_path)
    killed_at = time.monotonic()
    agent.kill9()
    run = cluster.wait_status(name, {"failed"}, timeout=cluster.lease_timeout + 10)
    elapsed = time.monotonic() - killed_at
    assert run["termination_reason"] == "agent lost"
    assert run["message"] == "agent lost"
    assert elapsed < cluster.lease_timeout + 3, elapsed
    agents = cluster.agents_json()
    assert agents[0]["status"] == "lost"


def test_job_output_env_and_exit_codes(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: env
            provider: bash
            environment:
              GREETING: hi there
            commands:
              - echo "$GREETING $RUN_NAME $WORKFLOW $JOB_ID"
          - name: fail
            provider: bash
            commands: ["echo before", "exit 3", "echo never"]
          - name: train
            provider: python
            file: train.py
            args: ["--epochs", "2"]
        """,
        {"train.py": "import sys\nprint('argv', sys.argv[1:])\n"},
    )
    r = cluster.cli("run", "env", cwd=project)
    assert r.returncode == 0
    name = search(r"(\S+) submitted", r.stderr).group(1)
    words = r.stdout.split()
    assert words[:4] == ["hi", "there", name, "env"]
    r = cluster.cli("run", "fail", cwd=project)
    assert r.returncode == 1
    assert r.stdout.splitlines() == ["before"]
    assert "exited with code 3" in r.stderr
    r = cluster.cli("run", "train", cwd=project)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "argv ['--epochs', '2']"


def test_pool_keeps_an_unsatisfiable_job_pending_with_a_reason(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: gpu
            provider: bash
            commands: ["nvidia-smi"]
            resources: {gpu: 1}
        """,
    )
    name = submit(cluster, project, "gpu")
    run = cluster.wait_status(name, {"pending"}, timeout=20)
    assert "needs 1 GPU; the largest agent has 0 GPUs" in str(run["message"])
    r = cluster.cli("ps")
    assert "needs 1 GPU" in r.stdout.replace("\n", " ").replace("  ", " ") or "needs" in r.stdout
    assert cluster.cli("stop", name).returncode == 0
    cluster.wait_status(name, {"stopped"})


def test_jobs_are_spread_and_all_finish_with_two_agents(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("a1")
    cluster.start_agent("a2")
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: quick
            provider: bash
            commands: ["echo ok"]
            resources: {cpu: 1}
        """,
    )
    names = [submit(cluster, project, "quick") for _ in range(6)]
    for n in names:
        assert cluster.wait_status(n, {"done", "failed"})["status"] == "done"
    agents_used = {r["jobs"][0]["agent"] for r in cluster.runs()}
    assert agents_used <= {"a1", "a2"}


def test_logs_follow_and_python_requirements(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: reqs
            provider: python
            file: main.py
            requirements: requirements.txt
        """,
        {
            # In a virtual environment of the agent's environment cache, whose creation the log shows first.
            "main.py": "import sys, time\nprint(sys.prefix != sys.base_prefix)\ntime.sleep(1)\nprint('end')\n",
            "requirements.txt": "# nothing to install\n",
        },
    )
    name = submit(cluster, project, "reqs")
    r = cluster.cli("logs", name, "-f", timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("dstack: installing requirements (0 packages) into a new environment"), lines
    assert lines[-2:] == ["True", "end"], lines


def test_interrupted_run_without_a_terminal_detaches_and_the_run_goes_on(cluster: Cluster, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    cluster.start_coordinator()
    cluster.start_agent()
    # The job goes on only when the test says so: under load, a fixed `sleep` could end before the
    # interrupt arrives, and the run would finish done with the CLI still following it.
    release = tmp_path / "release"
    project = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: slow
            provider: bash
            commands: ["echo started", "while [ ! -e {release} ]; do sleep 0.05; done", "echo finished"]
        """,
    )
    p = subprocess.Popen(
        [sys.executable, "-m", "dstack.cli", "run", "slow"],
        cwd=project,
        env=cluster.env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_as_from_a_terminal,
    )
    assert p.stdout is not None
    assert p.stdout.readline() == "started\n"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130
    assert "detached" in err and "Traceback" not in err
    name = search(r"(\S+) submitted", err).group(1)
    assert cluster.run_info(name)["status"] == "running"  # detached, not stopped
    release.touch()
    assert cluster.wait_status(name, {"done", "failed"})["status"] == "done"


def test_a_restarted_agent_kills_what_its_predecessor_left_running(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    agent = cluster.start_agent()
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: orphan
            provider: bash
            commands: ["sleep 600 &", "echo pid $!", "wait"]
        """,
    )
    name = submit(cluster, project, "orphan")
    pid = int(wait_for(lambda: re.findall(r"pid (\d+)", cluster.cli("logs", name).stdout), what="the job")[0])
    agent.kill9()
    assert psutil.pid_exists(pid)  # the job outlived its agent...
    cluster.agents.clear()
    cluster.start_agent()  # ...until the agent comes back with the same home
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", what="the orphan killed")
    run = cluster.wait_status(name, {"failed"})
    assert run["termination_reason"] in ("agent lost", "executor error")


def test_background_processes_end_with_the_job(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: bg
            provider: bash
            commands: ["sleep 300 &", "echo pid $!", "echo main done"]
        """,
    )
    started = time.monotonic()
    r = cluster.cli("run", "bg", cwd=project, timeout=60)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - started < 20  # not the 300 s of the background sleep
    pid = int(re.findall(r"pid (\d+)", r.stdout)[0])
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", timeout=10)


def test_a_job_that_ends_while_the_coordinator_is_down_is_reported_after_restart(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    go = tmp_path / "go"
    project = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: short
            provider: bash
            commands:
              - echo one
              - while [ ! -e {go} ]; do sleep 0.05; done
              - for i in $(seq 2 500); do echo line $i; done
              - exit 4
        """,
    )
    name = submit(cluster, project, "short")
    wait_for(lambda: "one" in cluster.cli("logs", name).stdout, what="the job to start")
    jobs_dir = cluster.tmp / "agent-1" / "jobs"
    assert any(jobs_dir.iterdir())  # the job's working directory, removed once the job has ended
    assert cluster.coordinator is not None
    cluster.coordinator.kill9()
    go.touch()  # only now may the job go on and end
    # The runner queues the job's last lines and final update in its outbox, then removes the
    # working directory: from then on, all that remains is to deliver them after the restart.
    wait_for(lambda: not any(jobs_dir.iterdir()), what="the job to end while the coordinator is down")
    cluster.start_coordinator()
    run = cluster.wait_status(name, {"done", "failed"}, timeout=60)
    assert run["status"] == "failed" and run["message"] == "exited with code 4", run
    assert cluster.cli("logs", name).stdout.splitlines() == ["one"] + [f"line {i}" for i in range(2, 501)]


def test_an_agent_slow_to_reconnect_after_a_coordinator_restart_is_not_lost(cluster: Cluster, tmp_path: Path) -> None:
    """An agent notices a restarted coordinator only at its next retry (its backoff and gRPC's add up,
    and a loaded host adds more): one lease period from the restart is not enough to declare it lost."""
    cluster.start_coordinator()
    agent = cluster.start_agent()
    name = start_long_job(cluster, tmp_path)
    assert cluster.coordinator is not None
    cluster.coordinator.kill9()
    agent.popen.send_signal(signal.SIGSTOP)  # the agent cannot retry: as if its backoff were long
    sessions = agent.output().count("connected to the coordinator")
    try:
        cluster.start_coordinator()
        restarted = time.monotonic()
        # What is under test is a duration: the agent stays away for longer than one lease period
        # (plus two passes of the lease checker) after the restart.
        wait_for(lambda: time.monotonic() > restarted + cluster.lease_timeout + 2, timeout=60, interval=0.2)
        assert cluster.run_info(name)["status"] == "running"
    finally:
        agent.popen.send_signal(signal.SIGCONT)
    wait_for(lambda: agent.output().count("connected to the coordinator") > sessions, what="the agent to reconnect")
    assert [a["status"] for a in cluster.agents_json()] == ["online"]
    assert cluster.run_info(name)["status"] == "running"
    assert cluster.cli("stop", name).returncode == 0
    assert cluster.wait_status(name, {"stopped", "failed"})["status"] == "stopped"
