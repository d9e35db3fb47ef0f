"""Why and when a job waits, and `dstack users set`, with a real coordinator, agent (simulated GPUs) and CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Cluster, JobJSON, wait_for, write_project

pytestmark = pytest.mark.integration

WORKFLOWS = """
workflows:
  - name: one
    provider: bash
    commands: ["sleep 600"]
    resources: {gpu: 1}
  - name: whole
    provider: bash
    commands: ["sleep 4"]
    resources: {gpu: 2}
"""


def submit(cluster: Cluster, project: Path, *args: str) -> str:
    r = cluster.cli("run", "-d", *args, cwd=project)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def waiting_job(cluster: Cluster, name: str) -> JobJSON:
    """The run's job once a scheduling pass has said why it waits."""
    return wait_for(
        lambda: j if (j := cluster.run_info(name)["jobs"][0])["wait_reason"] else None,
        interval=0.2,
        what=f"a wait reason for {name}",
    )


def test_ps_shows_position_reason_and_estimate_and_users_set_sets_quotas(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # the table's cells on one line each, to read them back
    cluster.start_coordinator()
    cluster.start_agent("gpu-box", "--simulate-gpus", "2xA100-80GB")
    project = write_project(tmp_path / "p", WORKFLOWS)

    r = cluster.cli("users", "set", "admin", "--max-gpus", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "admin: share 1, max GPUs 1, max running jobs no limit"
    r = cluster.cli("users", "set", "nobody", "--share", "2")
    assert r.returncode != 0 and "no user 'nobody'" in r.stderr and "Traceback" not in r.stderr
    r = cluster.cli("users", "set", "admin", "--share", "0")
    assert r.returncode != 0 and "--share must be a positive number" in r.stderr and "Traceback" not in r.stderr

    first = submit(cluster, project, "one")
    cluster.wait_status(first, {"running"})
    second = submit(cluster, project, "--priority", "3", "one")
    job = waiting_job(cluster, second)
    assert job["wait_reason"] == "quota" and job["queue_position"] == 1
    assert job["message"] == "quota: admin holds 1 of at most 1 GPUs"
    table = " ".join(cluster.cli("ps").stdout.split())
    assert "#1 (starts unknown) quota: admin holds 1 of at most 1 GPUs" in table

    r = cluster.cli("users", "set", "admin", "--max-gpus", "0")  # no limit again
    assert r.stdout.strip() == "admin: share 1, max GPUs no limit, max running jobs no limit"
    cluster.wait_status(second, {"running"})
    for name in (first, second):
        assert cluster.cli("stop", name).returncode == 0

    # A workflow that has run once has an expected duration: a job waiting behind it gets an estimate.
    done = submit(cluster, project, "whole")
    cluster.wait_status(done, {"done"})
    running = submit(cluster, project, "whole")
    behind = submit(cluster, project, "whole")
    # On a busy machine the run ahead (4 s) can end before `behind` is even submitted: then it never waits.
    job = wait_for(
        lambda: (
            j
            if (j := cluster.run_info(behind)["jobs"][0])["wait_reason"]
            or cluster.run_info(running)["status"] == "done"
            else None
        ),
        interval=0.2,
        what=f"a wait reason for {behind}, or the run ahead of it done",
    )
    table = " ".join(cluster.cli("ps").stdout.split())
    # Only while the job ahead was still running after both looks is an estimate certain (a busy machine
    # can take the 4 s of the run ahead between two CLI calls).
    if cluster.run_info(running)["status"] != "done":
        assert job["wait_reason"] == "resources" and job["queue_position"] == 1
        assert job["eta"] is not None
        assert "#1 (starts in" in table or "#1 (starts now)" in table
    cluster.wait_status(behind, {"done"})
    assert cluster.run_info(behind)["jobs"][0]["wait_reason"] is None  # no longer waiting: no reason
