"""Attempts: their ids on the agent protocol and seqs in the logs, the workflow fields, the
migration, and which interruptible jobs a starved job gets preempted."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dstack.cli.errors import WorkflowError
from dstack.cli.workflows import load_workflows
from dstack.coordinator.attempts import attempt_of_seq, parse_wire_job_id, stored_seq, wire_job_id
from dstack.coordinator.preemption import RunningJob, victims_for
from dstack.coordinator.scheduler import AgentState, Gpu, JobRequest
from dstack.coordinator.store import Store
from dstack.coordinator.store.jobs import format_duration


@pytest.mark.parametrize("attempt", [1, 2, 9, 10, 123456])
def test_an_attempt_s_wire_id_names_its_job_and_number(attempt: int) -> None:
    job_id = "0123456789abcdef0123456789abcdef"
    wire = wire_job_id(job_id, attempt)
    assert parse_wire_job_id(wire) == (job_id, attempt)
    assert (wire == job_id) == (attempt == 1)  # attempt 1 keeps the id agents always knew


@pytest.mark.parametrize("hostile", ["x-a1", "x-a0", "x-a01", "x-a", "x-a-2", "-a2x", "x-a1234567"])
def test_ids_that_are_not_a_later_attempt_are_attempt_1_of_themselves(hostile: str) -> None:
    assert parse_wire_job_id(hostile) == (hostile, 1)


def test_each_attempt_has_its_own_range_of_log_seqs() -> None:
    assert stored_seq(1, 7) == 7  # attempt 1's lines keep their seqs
    assert stored_seq(1, (1 << 32) - 1) < stored_seq(2, 1) < stored_seq(3, 1)
    assert [attempt_of_seq(stored_seq(n, 5)) for n in (1, 2, 3)] == [1, 2, 3]


@pytest.mark.parametrize(
    ("written", "seconds", "said"),
    [
        ("2h", 7200, "2h"),
        ("30m", 1800, "30m"),
        ("90s", 90, "1m30s"),
        ("1h30m", 5400, "1h30m"),
        ("1d", 86400, "1d"),
        ("45", 45, "45s"),
    ],
)
def test_max_duration_forms(tmp_path: Path, written: str, seconds: int, said: str) -> None:
    wf = load_workflows(_write(tmp_path, f"    max_duration: {written}\n"))["t"]
    assert wf.max_duration_s == seconds
    assert format_duration(seconds) == said  # as the termination message says it


def _write(tmp_path: Path, body: str) -> Path:
    (tmp_path / ".dstack").mkdir(exist_ok=True)
    text = "workflows:\n  - name: t\n    provider: bash\n    commands: [x]\n" + body
    (tmp_path / ".dstack" / "workflows.yaml").write_text(text)
    return tmp_path


def test_retry_defaults_to_every_cause_and_keeps_on_as_written(tmp_path: Path) -> None:
    wf = load_workflows(_write(tmp_path, "    retry: {limit: 2}\n"))["t"]
    assert wf.retry is not None and wf.retry.limit == 2 and list(wf.retry.on) == ["agent-lost", "preempted", "error"]
    wf = load_workflows(_write(tmp_path, "    retry:\n      limit: 1\n      on: error\n"))["t"]
    assert wf.retry is not None and list(wf.retry.on) == ["error"]  # `on:` is a key, not YAML 1.1's True
    assert load_workflows(_write(tmp_path, ""))["t"].retry is None


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("    retry: {limit: 101}\n", "from 0 to 100"),
        ("    retry: {limit: 1, on: [error, oom]}\n", "retry on 'oom'"),
        ("    retry: {limit: 1, on: [[error]]}\n", "item 1 of 'on' must be a string"),
        ("    max_duration: -5\n", "from 1 second to 366 days"),
        ("    max_duration: 2y\n", "is not a duration"),
        ("    max_duration: [1h]\n", "must be a duration"),
    ],
)
def test_bad_retry_and_max_duration_are_workflow_errors_with_a_line(tmp_path: Path, body: str, needle: str) -> None:
    with pytest.raises(WorkflowError) as e:
        load_workflows(_write(tmp_path, body))
    assert needle in str(e.value) and "workflows.yaml:5:" in str(e.value), str(e.value)


def test_migration_7_upgrades_a_version_6_database(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE job_attempts")
    for column in ("attempt", "stop_reason", "stop_message", "avoid_agent", "deadline_at"):
        conn.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
    conn.execute("PRAGMA user_version = 6")
    conn.commit()
    conn.close()
    s = Store(path)
    columns = {r[1] for r in s.conn.execute("PRAGMA table_info(jobs)")}
    assert {"attempt", "stop_reason", "stop_message", "avoid_agent", "deadline_at"} <= columns
    assert s.conn.execute("SELECT COUNT(*) FROM job_attempts").fetchone()[0] == 0
    assert s.conn.execute("PRAGMA user_version").fetchone()[0] >= 7


def agent(agent_id: str, cpu: float = 8, gpus: int = 0) -> AgentState:
    return AgentState(agent_id, agent_id, cpu, 64 << 30, [Gpu(i, "A100", 80 << 30) for i in range(gpus)], 100)


def holding(a: AgentState, *jobs: RunningJob) -> AgentState:
    for j in jobs:
        a.used_cpu += j.cpu
        a.busy_gpus.update(j.gpu_indices)
        a.jobs += 1
    return a


def running(job_id: str, agent_id: str, gpus: tuple[int, ...], interruptible: bool = True) -> RunningJob:
    return RunningJob(job_id, agent_id, 1.0, 0, gpus, interruptible, False)


def test_the_fewest_interruptible_jobs_of_one_agent_are_chosen() -> None:
    on_a = [running("a1", "a", (0,)), running("a2", "a", (1, 2)), running("a3", "a", (3,), interruptible=False)]
    on_b = [running("b1", "b", (0,)), running("b2", "b", (1,)), running("b3", "b", (2,)), running("b4", "b", (3,))]
    agents = [holding(agent("a", gpus=4), *on_a), holding(agent("b", gpus=4), *on_b)]
    req = JobRequest("big", cpu=1, gpu_count=2)
    assert victims_for(req, agents, on_a + on_b) == ["a2"]  # one job with two GPUs, not two jobs of b


def test_no_victims_when_the_job_fits_or_could_not_fit_even_so() -> None:
    steady = [running("s", "a", (0, 1), interruptible=False), running("i", "a", (2,))]
    agents = [holding(agent("a", gpus=4), *steady)]
    assert victims_for(JobRequest("fits", gpu_count=1), agents, steady) == []  # GPU 3 is free
    assert victims_for(JobRequest("too-big", gpu_count=3), agents, steady) == []  # the steady job holds two
    assert victims_for(JobRequest("never", gpu_count=8), agents, steady) == []


def test_jobs_already_being_preempted_count_as_gone() -> None:
    jobs = [RunningJob("i1", "a", 1.0, 0, (0, 1), True, True), running("i2", "a", (2, 3))]
    agents = [holding(agent("a", gpus=4), *jobs)]
    assert victims_for(JobRequest("w", gpu_count=2), agents, jobs) == []  # i1's GPUs are on their way
    assert victims_for(JobRequest("w", gpu_count=4), agents, jobs) == ["i2"]
