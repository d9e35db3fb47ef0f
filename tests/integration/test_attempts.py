"""Attempts with real processes: preemption resumes from a checkpoint, a killed agent's job is retried
on another agent (once per attempt), a retry limit, and max_duration."""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest

from tests.conftest import Cluster, wait_for, write_project

pytestmark = pytest.mark.integration

# Counts to 30, one step per 0.2 s, keeping the count in a `mount: true` folder: an attempt that
# finds the counter there continues from it.
TRAIN = """
workflows:
  - name: train
    provider: bash
    commands:
      - n=$(cat ckpt/counter 2>/dev/null || echo 0)
      - echo "start at $n, attempt $DSTACK_ATTEMPT"
      - while [ "$n" -lt 30 ]; do n=$((n+1)); echo "$n" > ckpt/counter; echo "step $n"; sleep 0.2; done
    artifacts:
      - path: ckpt
        mount: true
    resources:
      interruptible: true
"""


def submit(cluster: Cluster, project: Path, workflow: str) -> str:
    r = cluster.cli("run", workflow, "-d", cwd=project)
    assert r.returncode == 0, r.stderr
    return next(run["name"] for run in cluster.runs() if run["workflow"] == workflow)


def logs(cluster: Cluster, run: str, *extra: str) -> str:
    r = cluster.cli("logs", run, *extra)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_a_preempted_job_resumes_from_its_checkpoint_with_both_attempts_logs(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("a", "--mount-sync", "0.5")
    project = write_project(tmp_path / "p", TRAIN)
    run = submit(cluster, project, "train")
    wait_for(lambda: "step 5\n" in logs(cluster, run), what="a few steps of attempt 1")

    r = cluster.cli("stop", "--preempt", run)
    assert r.returncode == 0, r.stderr
    assert "1 job(s) preempted" in r.stdout

    done = cluster.wait_status(run, {"done", "failed", "stopped"}, timeout=90)
    assert done["status"] == "done", done
    (job,) = done["jobs"]
    assert job["attempt"] == 2
    (first,) = job["attempts"]
    assert (first["attempt"], first["termination_reason"], first["agent"]) == (1, "preempted", "a")

    text = logs(cluster, run)
    one, two = text.split("── attempt 2 ──\n")
    assert one.startswith("── attempt 1 ──\nstart at 0, attempt 1\n"), text
    # Attempt 2 starts from the counter attempt 1 saved when it was stopped, not from 0.
    # The agent says it fetched the saved folder before the job starts.
    fetched, head = two.splitlines()[:2]
    assert fetched == f"dstack: 1 artifact file(s) from {run}/train", text
    resumed_at = int(head.removeprefix("start at ").split(",")[0])
    assert head == f"start at {resumed_at}, attempt 2" and resumed_at >= 5, text
    steps_two = [ln for ln in two.splitlines() if ln.startswith("step ")]
    assert steps_two[0] == f"step {resumed_at + 1}" and steps_two[-1] == "step 30", text
    # One attempt's lines alone.
    assert logs(cluster, run, "--attempt", "2") == "── attempt 2 ──\n" + two
    ps = cluster.cli("ps", "-a")
    assert "(attempt 2)" in ps.stdout, ps.stdout


def test_preempt_is_refused_for_a_job_that_is_not_interruptible(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("a")
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: serve
            provider: bash
            commands: ["echo up", "sleep 60"]
        """,
    )
    run = submit(cluster, project, "serve")
    wait_for(lambda: "up\n" in logs(cluster, run), what="the job to run")
    r = cluster.cli("stop", "--preempt", run)
    assert r.returncode == 1 and "nothing to preempt" in r.stdout, r.stdout + r.stderr
    assert cluster.run_info(run)["status"] == "running"
    assert cluster.cli("stop", run).returncode == 0


def test_a_job_on_a_killed_agent_runs_again_on_another_agent_once_per_attempt(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    doomed = cluster.start_agent("a")
    starts = tmp_path / "starts.txt"
    project = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: job
            provider: bash
            commands:
              - echo "attempt $DSTACK_ATTEMPT" >> {starts}
              - echo "running attempt $DSTACK_ATTEMPT"
              - if [ "$DSTACK_ATTEMPT" = 1 ]; then sleep 20; fi
            retry:
              limit: 2
              on: [agent-lost]
        """,
    )
    run = submit(cluster, project, "job")
    wait_for(lambda: "running attempt 1\n" in logs(cluster, run), what="attempt 1 to run on a")
    cluster.start_agent("b")
    doomed.kill9()  # its lease (3 s) runs out: the job is requeued, and b is the one agent left

    done = cluster.wait_status(run, {"done", "failed", "stopped"}, timeout=90)
    assert done["status"] == "done", done
    (job,) = done["jobs"]
    assert (job["attempt"], job["agent"]) == (2, "b")
    (first,) = job["attempts"]
    assert (first["agent"], first["termination_reason"]) == ("a", "agent lost")
    # Attempt 1 started once (its orphaned process does not start again), attempt 2 once.
    assert starts.read_text().splitlines() == ["attempt 1", "attempt 2"]
    text = logs(cluster, run)
    assert "── attempt 1 ──\nrunning attempt 1\n── attempt 2 ──\nrunning attempt 2\n" in text, text


def test_a_partitioned_agent_that_comes_back_is_made_to_abort_its_old_attempt(cluster: Cluster, tmp_path: Path) -> None:
    """The agent is frozen (SIGSTOP) past its lease while its job runs on: the job is retried on
    another agent; when the frozen one wakes up and reconnects, its attempt 1 is aborted (the process
    dies), and what it saves or reports for attempt 1 changes nothing: the artifacts are attempt 2's."""
    cluster.start_coordinator()
    frozen = cluster.start_agent("a", "--mount-sync", "0.3")
    starts, pids = tmp_path / "starts.txt", tmp_path / "pids"
    pids.mkdir()
    project = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: job
            provider: bash
            commands:
              - echo "attempt $DSTACK_ATTEMPT" >> {starts}
              - echo $$ > {pids}/$DSTACK_ATTEMPT
              - ticks=$([ "$DSTACK_ATTEMPT" = 1 ] && echo 600 || echo 5)
              - for i in $(seq 1 $ticks); do echo "$DSTACK_ATTEMPT $i" > out/who; echo "tick $i"; sleep 0.1; done
            artifacts:
              - path: out
                mount: true
            retry:
              limit: 1
              on: [agent-lost]
        """,
    )
    run = submit(cluster, project, "job")
    wait_for(lambda: "tick 3\n" in logs(cluster, run), what="attempt 1 to run on a")
    cluster.start_agent("b")
    frozen.popen.send_signal(signal.SIGSTOP)
    try:
        done = cluster.wait_status(run, {"done", "failed", "stopped"}, timeout=90)
    finally:
        frozen.popen.send_signal(signal.SIGCONT)
    assert done["status"] == "done", done
    assert (done["jobs"][0]["attempt"], done["jobs"][0]["agent"]) == (2, "b")
    first = psutil.Process(int((pids / "1").read_text()))  # still running while its agent was frozen
    first.wait(timeout=60)  # aborted once its agent is back and reconnects
    wait_for(
        lambda: any(a["name"] == "a" and a["status"] == "online" for a in cluster.agents_json()),
        what="agent a back online",
    )
    assert starts.read_text().splitlines() == ["attempt 1", "attempt 2"]
    r = cluster.cli("artifacts", "download", run, "-o", str(tmp_path / "got"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "got" / "out" / "who").read_text() == "2 5\n"
    final = cluster.run_info(run)
    assert final["status"] == "done" and final["jobs"][0]["attempt"] == 2, final


def test_the_retry_limit_reached_fails_the_run_with_the_last_reason(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("a")
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: flaky
            provider: bash
            commands: ["echo try $DSTACK_ATTEMPT", "exit 3"]
            retry: {limit: 2, on: [error]}
        """,
    )
    r = cluster.cli("run", "flaky", cwd=project)
    assert r.returncode != 0
    run = next(x for x in cluster.runs() if x["workflow"] == "flaky")
    assert run["status"] == "failed" and run["termination_reason"] == "exit code", run
    assert "retry limit 2 reached" in (run["message"] or ""), run
    (job,) = run["jobs"]
    assert job["attempt"] == 3 and [a["termination_reason"] for a in job["attempts"]] == ["exit code"] * 2
    text = logs(cluster, run["name"])
    assert [ln for ln in text.splitlines() if ln.startswith("try")] == ["try 1", "try 2", "try 3"], text


def test_max_duration_stops_a_job_that_runs_longer_with_that_reason(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("a")
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: long
            provider: bash
            commands: ["echo begin", "sleep 120", "echo never"]
            max_duration: 2s
        """,
    )
    run = submit(cluster, project, "long")
    ended = cluster.wait_status(run, {"done", "failed", "stopped"}, timeout=60)
    assert ended["status"] == "failed", ended
    assert ended["termination_reason"] == "max duration" and ended["message"] == "max_duration 2s exceeded", ended
    text = logs(cluster, run)
    assert "begin" in text and "never" not in text
    ps = cluster.cli("ps", "-a")
    assert "max_duration 2s exceeded" in ps.stdout, ps.stdout
