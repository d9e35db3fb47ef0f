"""The job and run state machine (coordinator/lifecycle): the table itself, its documentation, and
that it is the only writer of a status."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from enum import IntEnum
from pathlib import Path

import pytest
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from dstack.coordinator import lifecycle
from dstack.coordinator.lifecycle import JOB_TRANSITIONS, RUN_TRANSITIONS, derive_run_status
from dstack.coordinator.model import (
    TERMINAL_JOB,
    TERMINAL_RUN,
    JobStatus,
    JobUpdate,
    LogStream,
    RunStatus,
    TerminationReason,
)
from dstack.coordinator.store import NewJob, Placement, Store
from dstack.protos.v1 import common_pb2

REPO = Path(__file__).resolve().parents[2]
JS, RS = JobStatus, RunStatus


def test_the_docs_show_the_current_table() -> None:
    doc = (REPO / "docs" / "lifecycle.md").read_text()
    assert doc == lifecycle.with_section(doc), "run: python -m dstack.coordinator.lifecycle --write"


@pytest.mark.parametrize(
    ("enum", "proto", "prefix"),
    [
        (JobStatus, common_pb2.JobStatus, "JOB_STATUS_"),
        (RunStatus, common_pb2.RunStatus, "RUN_STATUS_"),
        (TerminationReason, common_pb2.TerminationReason, "TERMINATION_REASON_"),
        (LogStream, common_pb2.LogStream, "LOG_STREAM_"),
    ],
)
def test_the_domain_enums_keep_the_wire_numbers(enum: type[IntEnum], proto: EnumTypeWrapper, prefix: str) -> None:
    wire = {name.removeprefix(prefix): value for name, value in proto.items()}
    if "UNSPECIFIED" not in enum.__members__:  # a job or run always has a status
        del wire["UNSPECIFIED"]
    assert {m.name: m.value for m in enum} == wire


def _reachable(transitions: Iterable[lifecycle.JobTransition | lifecycle.RunTransition]) -> set[int]:
    seen = {t.dst for t in transitions if not t.src}  # the states things are created in
    while True:
        more = {t.dst for t in transitions if t.src & seen} - seen
        if not more:
            return set(seen)
        seen |= more


def test_every_status_is_reachable() -> None:
    assert _reachable(JOB_TRANSITIONS) == set(JobStatus)
    assert _reachable(RUN_TRANSITIONS) == set(RunStatus)


def test_final_states_have_no_exits() -> None:
    assert [t.name for t in JOB_TRANSITIONS if t.src & TERMINAL_JOB] == []
    assert [t.name for t in RUN_TRANSITIONS if t.src & TERMINAL_RUN] == []
    every: list[lifecycle.JobTransition | lifecycle.RunTransition] = [*JOB_TRANSITIONS, *RUN_TRANSITIONS]
    assert all(t.dst not in t.src for t in every)  # a repeat is no transition


def test_a_final_job_state_records_a_reason() -> None:
    for t in JOB_TRANSITIONS:
        if t.dst in TERMINAL_JOB:
            assert t.reason is not None or t.actor == lifecycle.Actor.AGENT, t.name  # agents say why


def test_only_the_lifecycle_writes_a_status() -> None:
    # A status in the SET list (not in the WHERE clause), or a new job or run.
    writes = re.compile(
        r"UPDATE\s+(jobs|runs|agents)\s+SET(?:(?!\bWHERE\b).)*?\bstatus\s*=|INSERT\s+INTO\s+(jobs|runs|agents)\b",
        re.S,
    )
    offenders = []
    for path in sorted((REPO / "coordinator").rglob("*.py")):
        if path.name == "schema.py":  # shipped migrations are never edited (migration 5 retires agents)
            continue
        text = path.read_text()
        for m in writes.finditer(text):
            # Creating a job or run (INSERT) is allowed to the store, in its creation transition's state.
            if "lifecycle" in path.parts or (m.group(2) and "lifecycle." in text):
                continue
            offenders.append(f"{path.relative_to(REPO)}: {m.group(0)[:60]!r}")
    assert offenders == []


def _one_job_run(s: Store) -> tuple[str, str, str]:
    spec = common_pb2.JobSpec(job_name="a", commands=["true"]).SerializeToString()
    created = s.create_run("admin", "wf", b"", "", [], [NewJob("a", spec, 0, 0, 0, [])])
    agent_id = s.register_agent("h", "tok", b"")
    return created.name, created.job_ids[0], agent_id


def test_a_forbidden_transition_is_refused_and_logged_with_both_states(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = Store(tmp_path / "db.sqlite")
    name, job_id, agent_id = _one_job_run(s)
    s.apply_schedule([Placement(job_id, agent_id, [])], [], [])
    s.apply_job_updates(agent_id, [JobUpdate(job_id, JS.DONE, TerminationReason.DONE)])
    with caplog.at_level(logging.INFO, logger="dstack.coordinator"):
        res = s.apply_job_updates(agent_id, [JobUpdate(job_id, JS.RUNNING)])
    assert len(res.acks) == 1 and not res.changed_runs  # acknowledged, changes nothing
    assert s.jobs_of_runs([s.run_by_name(name).id])[s.run_by_name(name).id][0].status == JS.DONE
    refusals = [r.getMessage() for r in caplog.records if r.name == "dstack.coordinator"]
    assert refusals == [f"job {job_id}: refused transition done -> running (agent report)"]


def test_a_stop_wins_over_a_placement_decided_before_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = Store(tmp_path / "db.sqlite")
    name, job_id, agent_id = _one_job_run(s)
    s.request_stop(name)  # between the scheduler's snapshot and its decision
    with caplog.at_level(logging.INFO, logger="dstack.coordinator"):
        assert s.apply_schedule([Placement(job_id, agent_id, [])], [], []) == []
    run = s.run_by_name(name)
    job = s.jobs_of_runs([run.id])[run.id][0]
    assert (job.status, job.agent_id, run.status) == (JS.STOPPED, None, RS.STOPPED)
    assert f"job {job_id}: refused transition stopped -> assigned (place, by scheduler)" in caplog.text


def test_a_stop_requested_job_ends_stopped_by_user_however_the_agent_saw_it(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    name, job_id, agent_id = _one_job_run(s)
    s.apply_schedule([Placement(job_id, agent_id, [])], [], [])
    assert s.request_stop(name) == [(job_id, agent_id)]
    s.apply_job_updates(agent_id, [JobUpdate(job_id, JS.FAILED, TerminationReason.EXIT_CODE, "killed by SIGTERM")])
    run = s.run_by_name(name)
    job = s.jobs_of_runs([run.id])[run.id][0]
    assert (job.status, job.termination_reason, job.message) == (
        JS.STOPPED,
        TerminationReason.STOPPED_BY_USER,
        "stopped by user",
    )
    assert (run.status, run.termination_reason) == (RS.STOPPED, TerminationReason.STOPPED_BY_USER)


def test_a_run_status_follows_its_jobs() -> None:
    R = TerminationReason
    assert derive_run_status([(JS.DONE, R.DONE, "", "a"), (JS.PENDING, 0, "", "b")])[0] == RS.PENDING
    assert derive_run_status([(JS.PULLING, 0, "", "a"), (JS.ASSIGNED, 0, "", "b")])[0] == RS.PULLING
    assert derive_run_status([(JS.PULLING, 0, "", "a"), (JS.RUNNING, 0, "", "b")])[0] == RS.RUNNING
    assert derive_run_status([(JS.UPLOADING, 0, "", "a"), (JS.SUBMITTED, 0, "", "b")])[0] == RS.UPLOADING
    failed = derive_run_status(
        [(JS.STOPPED, R.STOPPED_BY_USER, "stopped by user", "a"), (JS.FAILED, R.EXIT_CODE, "exit 1", "b")]
    )
    assert failed == (RS.FAILED, R.EXIT_CODE, "b: exit 1")
    assert derive_run_status([(JS.DONE, R.DONE, "", "a")]) == (RS.DONE, R.DONE, "")
