"""Agents' reports applied in batches (coordinator/reports.py, store/jobs.py `apply_updates_many`): many
agents' messages in one store call must leave the store exactly as one report at a time does; a message
that fails undoes only itself; a job's reports keep their order; a report from an agent that does not hold
the attempt changes nothing, whatever else is in its batch; and the batch pays once for what one message
at a time paid per message (the count test at the end)."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dstack.coordinator.attempts import wire_job_id
from dstack.coordinator.model import JobStatus, JobUpdate, RunStatus, TerminationReason
from dstack.coordinator.reports import ReportBatcher
from dstack.coordinator.store import NewJob, Placement, Store, UpdateResult
from dstack.coordinator.store.executor import DbExecutor
from dstack.protos.v1 import common_pb2

NOW = 5_000_000_000


def _job(name: str, retry: bool = False) -> NewJob:
    spec = common_pb2.JobSpec(job_name=name, commands=["true"])
    if retry:
        spec.retry.CopyFrom(common_pb2.RetryPolicy(limit=2, on=["agent-lost", "error"]))
    return NewJob(name, spec.SerializeToString(), 1.0, 0, 0, [])


def _pool(path: Path, agents: int, runs: int, retry_every: int = 0) -> tuple[Store, list[str], list[str]]:
    """A store with `runs` single-job runs, one placed on each agent in turn (round robin); -> (store,
    agent ids, job ids). Every `retry_every`-th job is retried on error. The runs' jobs share a step-cache
    base, as runs of one workflow do."""
    s = Store(path, clock=lambda: NOW)
    ids = [s.register_agent(f"h{i}", f"tok{i}", b"") for i in range(agents)]
    for a in ids:
        s.agent_online(a, b"", 2**62)
    jobs = []
    for k in range(runs):
        run = s.create_run("u", "wf", b"", "", [], [_job("main", retry=bool(retry_every) and k % retry_every == 0)])
        jobs += run.job_ids
    s.apply_schedule([Placement(j, ids[k % agents], []) for k, j in enumerate(jobs)], [], [])
    s.conn.execute("UPDATE jobs SET cache_base = 'base-of-wf'")  # as a cacheable job's INSERT writes it
    return s, ids, jobs


def _state(s: Store) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]], list[tuple[object, ...]]]:
    jobs = s.conn.execute(
        "SELECT id, status, attempt, agent_id, started_at, finished_at, termination_reason, message, exit_code,"
        " cache_key, usage_charged FROM jobs ORDER BY id"
    ).fetchall()
    runs = s.conn.execute(
        "SELECT id, status, termination_reason, message, finished_at FROM runs ORDER BY id"
    ).fetchall()
    attempts = s.conn.execute(
        "SELECT job_id, attempt, agent_id, termination_reason FROM job_attempts ORDER BY job_id, attempt"
    ).fetchall()
    return jobs, runs, attempts


def _usage(s: Store) -> dict[str, float]:
    return {r[0]: r[1] for r in s.conn.execute('SELECT "user", value FROM usage').fetchall()}


def _acks(results: Sequence[UpdateResult | Exception]) -> list[list[tuple[str, int]]]:
    return [[(a.job_id, a.status) for a in r.acks] if isinstance(r, UpdateResult) else [] for r in results]


REPORTS = [
    (JobStatus.RUNNING, TerminationReason.UNSPECIFIED, None),
    (JobStatus.DONE, TerminationReason.DONE, 0),
    (JobStatus.FAILED, TerminationReason.EXIT_CODE, 3),
    (JobStatus.STOPPED, TerminationReason.STOPPED_BY_USER, None),
]


def _copy(s: Store, path: Path) -> Store:
    """A second store with the same rows (ids included)."""
    with sqlite3.connect(path) as dest:
        s.conn.backup(dest)
    dest.close()
    return Store(path, clock=lambda: NOW)


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 2**32))
def test_a_batch_leaves_the_store_as_one_report_at_a_time_does(
    tmp_path_factory: pytest.TempPathFactory, seed: int
) -> None:
    """Random messages from 4 agents (RUNNING, DONE, FAILED with and without retry, STOPPED; RUNNING and DONE
    of a job one after the other; the same job twice in one message; a job of another agent; an attempt that
    is over), applied as one batch and, in a copy of the store, one report per store call: jobs, attempts,
    runs, usage and acknowledgements agree."""
    rng = random.Random(seed)
    tmp = tmp_path_factory.mktemp("batch")
    batched, agents, jobs = _pool(tmp / "a.sqlite", 4, 8, retry_every=3)
    single = _copy(batched, tmp / "b.sqlite")
    owner = {j: agents[k % 4] for k, j in enumerate(jobs)}
    messages: list[tuple[str, list[JobUpdate]]] = []
    for _ in range(rng.randint(1, 10)):
        agent = rng.choice(agents)
        updates = []
        for _ in range(rng.randint(1, 4)):
            mine = [j for j in jobs if owner[j] == agent]
            job = rng.choice(mine if rng.random() < 0.85 else jobs)  # now and then another agent's job
            attempt = 2 if rng.random() < 0.1 else 1  # now and then an attempt it does not hold
            if rng.random() < 0.3:  # ran and ended done in one message (one write for both: store/jobs.py)
                updates += _running_and_done(wire_job_id(job, attempt))
                continue
            status, reason, code = rng.choice(REPORTS)
            at = NOW - (3 if status == JobStatus.RUNNING else 1) * 10**9  # ran 2 s: usage to charge
            updates.append(JobUpdate(wire_job_id(job, attempt), int(status), reason, "m", code, at))
        messages.append((agent, updates))

    results = batched.apply_job_updates_many(messages)
    one_by_one: list[UpdateResult] = []
    for agent, updates in messages:
        acks = UpdateResult()
        for u in updates:
            acks.acks += single.apply_job_updates(agent, [u]).acks
        one_by_one.append(acks)

    assert _state(batched) == _state(single)
    assert _usage(batched) == pytest.approx(_usage(single))
    ran = [r for r in _state(batched)[0] if isinstance(r[4], int) and isinstance(r[5], int) and r[5] > r[4] and r[10]]
    assert _usage(batched) or not ran  # (the case where it is charged is tried, not only the empty one)
    assert _acks(results) == _acks(one_by_one)
    batched.close()
    single.close()


@contextmanager
def statements(conn: sqlite3.Connection) -> Iterator[list[str]]:
    """The statements run on `conn` meanwhile. Python reports a statement again for each trigger program
    it starts (with the statement's own text): consecutive repeats are one statement."""
    seen: list[str] = []
    conn.set_trace_callback(lambda sql: seen.append(sql) if not seen or seen[-1] != sql else None)
    try:
        yield seen
    finally:
        conn.set_trace_callback(None)


def _running_and_done(job_id: str) -> list[JobUpdate]:
    return [
        JobUpdate(job_id, int(JobStatus.RUNNING), time_ns=NOW - 2 * 10**9),
        JobUpdate(job_id, int(JobStatus.DONE), TerminationReason.DONE, exit_code=0, time_ns=NOW - 10**9),
    ]


def test_a_message_that_fails_in_a_batch_undoes_only_itself(tmp_path: Path) -> None:
    """A database error in the second agent's message (a trigger refuses its second job's end): that
    message's result is the error and none of its reports stay (its first job is not left running); the
    messages before and after it are applied, their runs finished and charged."""
    s, agents, jobs = _pool(tmp_path / "db.sqlite", 3, 6)  # agent k holds jobs k and k + 3
    s.conn.execute(
        f"CREATE TEMP TRIGGER boom BEFORE UPDATE OF status ON jobs WHEN NEW.id = '{jobs[4]}'"
        " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
    )
    messages = [(agents[k], _running_and_done(jobs[k]) + _running_and_done(jobs[k + 3])) for k in range(3)]
    before = {
        r[0]: RunStatus(r[1])
        for r in s.conn.execute("SELECT j.id, r.status FROM jobs j JOIN runs r ON r.id = j.run_id")
    }
    results = s.apply_job_updates_many(messages)
    assert isinstance(results[1], sqlite3.IntegrityError)
    assert all(isinstance(results[k], UpdateResult) for k in (0, 2))
    status = dict(s.conn.execute("SELECT id, status FROM jobs").fetchall())
    assert [JobStatus(status[j]) for j in jobs] == [
        JobStatus.DONE,
        JobStatus.ASSIGNED,  # undone with the rest of its message
        JobStatus.DONE,
        JobStatus.DONE,
        JobStatus.ASSIGNED,
        JobStatus.DONE,
    ]
    runs = {
        r[0]: RunStatus(r[1])
        for r in s.conn.execute("SELECT j.id, r.status FROM jobs j JOIN runs r ON r.id = j.run_id")
    }
    assert [runs[j] for j in jobs] == [
        RunStatus.DONE,
        before[jobs[1]],
        RunStatus.DONE,
        RunStatus.DONE,
        before[jobs[4]],
        RunStatus.DONE,
    ]
    charged = dict(s.conn.execute("SELECT id, usage_charged FROM jobs").fetchall())
    assert [charged[j] for j in jobs] == [1, 0, 1, 1, 0, 1]
    # Sent again (the agent had no acknowledgement) once the cause is gone, it applies.
    s.conn.execute("DROP TRIGGER boom")
    again = s.apply_job_updates_many([messages[1]])
    assert isinstance(again[0], UpdateResult)
    assert {JobStatus(s.conn.execute("SELECT status FROM jobs WHERE id = ?", [j]).fetchone()[0]) for j in jobs} == {
        JobStatus.DONE
    }


def test_a_job_s_reports_keep_their_order_in_a_message_and_across_messages_of_a_batch(tmp_path: Path) -> None:
    s, agents, jobs = _pool(tmp_path / "db.sqlite", 2, 4)  # agent 0: jobs 0 and 2; agent 1: jobs 1 and 3
    running, done = _running_and_done(jobs[0])
    late_running = JobUpdate(jobs[2], int(JobStatus.RUNNING), time_ns=NOW)
    results = s.apply_job_updates_many(
        [
            (agents[0], [running, done]),  # in order: runs, then ends done, started and finished stamped
            (agents[1], [_running_and_done(jobs[1])[1], _running_and_done(jobs[1])[0]]),  # done, then a late RUNNING
            (agents[0], [_running_and_done(jobs[2])[1]]),  # job 2 ends in one message ...
            (agents[0], [late_running]),  # ... and a RUNNING in the next message of the batch is refused
        ]
    )
    assert [len(r.acks) for r in results if isinstance(r, UpdateResult)] == [2, 2, 1, 1]
    row = {
        r[0]: (JobStatus(r[1]), r[2], r[3])
        for r in s.conn.execute("SELECT id, status, started_at, finished_at FROM jobs").fetchall()
    }
    assert row[jobs[0]] == (JobStatus.DONE, NOW - 2 * 10**9, NOW - 10**9)
    assert row[jobs[1]][0] == JobStatus.DONE and row[jobs[1]][1] is None  # the RUNNING after it changed nothing
    assert row[jobs[2]][0] == JobStatus.DONE and row[jobs[2]][1] is None
    assert row[jobs[3]][0] == JobStatus.ASSIGNED


def test_reports_of_an_attempt_the_agent_does_not_hold_change_nothing_in_a_batch(tmp_path: Path) -> None:
    """Agent h0 lost its job (requeued as attempt 2 and placed on h1). In one batch: h0's DONE of attempt 1,
    h0's DONE of the new attempt (not its own), h1's RUNNING of attempt 2, and h1's DONE of a job of h0's:
    only h1's report of its own attempt applies; every report is acknowledged."""
    s, agents, jobs = _pool(tmp_path / "db.sqlite", 2, 2)
    retried = s.create_run("u", "wf", b"", "", [], [_job("main", retry=True)]).job_ids[0]
    s.apply_schedule([Placement(retried, agents[0], [])], [], [])
    assert s.jobs.fail_lost_by_agent(agents[0], [retried]) == [retried]  # requeued as attempt 2
    s.apply_schedule([Placement(retried, agents[1], [])], [], [])
    second = wire_job_id(retried, 2)
    results = s.apply_job_updates_many(
        [
            (agents[0], [_running_and_done(retried)[1], _running_and_done(second)[1]]),
            (agents[1], [JobUpdate(second, int(JobStatus.RUNNING), time_ns=NOW), _running_and_done(jobs[0])[1]]),
        ]
    )
    assert [[(a.job_id, a.status) for a in r.acks] for r in results if isinstance(r, UpdateResult)] == [
        [(retried, JobStatus.DONE), (second, JobStatus.DONE)],
        [(second, JobStatus.RUNNING), (jobs[0], JobStatus.DONE)],
    ]
    row = s.conn.execute("SELECT status, attempt, agent_id FROM jobs WHERE id = ?", [retried]).fetchone()
    assert (JobStatus(row[0]), row[1], row[2]) == (JobStatus.RUNNING, 2, agents[1])
    assert JobStatus(s.conn.execute("SELECT status FROM jobs WHERE id = ?", [jobs[0]]).fetchone()[0]) == (
        JobStatus.ASSIGNED
    )


def test_a_batch_pays_once_for_what_a_message_paid_each_time(tmp_path: Path) -> None:
    """20 agents each report RUNNING and DONE of their job (20 single-job runs) in one batch: one read of the
    rows all the messages name and one UPDATE for all their jobs, each job's RUNNING and DONE in it; the runs'
    statuses in one read of their jobs, one of the runs and one UPDATE for all; the charge in one read; and the
    step-cache key with the DONE, not a read and a write of its own (each message alone paid all of these: 10
    statements a job; a read of its rows per message before the batch's one read)."""
    s, agents, jobs = _pool(tmp_path / "db.sqlite", 20, 20)
    s.journal.drain()  # the journal of changes a pass reads (store/journal.py), empty
    with statements(s.conn) as seen:
        results = s.apply_job_updates_many([(a, _running_and_done(j)) for a, j in zip(agents, jobs, strict=True)])
    assert all(isinstance(r, UpdateResult) for r in results)
    # The shared write is journaled job by job, as one write per job was: each ended, its run changed.
    changes = s.journal.drain()
    assert changes is not None and sorted(changes.off_agents) == sorted(jobs) and not changes.on_agents
    assert changes.runs == {r[0] for r in s.conn.execute("SELECT id FROM runs")}
    assert {RunStatus(r[0]) for r in s.conn.execute("SELECT status FROM runs")} == {RunStatus.DONE}
    keys = {r[0] for r in s.conn.execute("SELECT cache_key FROM jobs")}
    assert len(keys) == 1 and "" not in keys  # written with DONE (one workflow's jobs without inputs: one key)

    def count(prefix: str) -> int:
        return sum(1 for q in seen if q.lstrip().startswith(prefix))

    assert count("SELECT id, attempt, status") == 1  # the rows the batch's messages name, in one read
    # RUNNING and DONE of every job, in one write for the batch (each job's own values in it).
    assert count("UPDATE jobs SET") == 0 and count("WITH v(_id") == 1
    assert count("SELECT run_id, status") == 1 and count("SELECT id, status FROM runs") == 1
    assert count("UPDATE runs") == 1
    assert count("SELECT j.job_name, j.status, j.started_at") == 1  # the charge
    assert count("SELECT cache_base") == 0 and count("UPDATE jobs SET cache_key") == 0
    assert count("SELECT status FROM jobs") == 0  # no refusal read
    # No savepoint per message while none fails (coordinator/store/jobs.py, optimistic): one for the batch.
    assert count("SAVEPOINT") == 1 and count("RELEASE") == 1 and count("ROLLBACK") == 0
    # Everything: 10 for the batch (a begin, its savepoint and commit included), nothing per job.
    assert len(seen) <= 12, seen


def test_a_batch_screens_its_messages_in_one_statement_and_applies_only_each_agent_s_own(tmp_path: Path) -> None:
    """Through the batcher (coordinator/reports.py), with its DB thread: 20 agents' RUNNING and DONE, and a
    rogue's message that names a victim's job (its DONE, with an environment) beside its own job's, all in
    one batch. Whose attempt each report is, is read once for the whole batch (one statement, not a DB trip
    per message); the rogue's report of the victim's job is acknowledged, handed back as foreign, and
    changes nothing (nor is its environment kept), while its own job's report and environment are applied."""
    s, agents, jobs = _pool(tmp_path / "db.sqlite", 21, 21)
    rogue, victim_job, own_job = agents[20], jobs[0], jobs[20]
    env = {"runtime": "null", "os": "forged"}

    async def batch() -> list[UpdateResult]:
        db = DbExecutor(s)
        try:
            batcher = ReportBatcher(s, db)
            futs = [batcher.apply(a, _running_and_done(j)) for a, j in zip(agents[:20], jobs[:20], strict=True)]
            rogue_updates = [_running_and_done(victim_job)[1], *_running_and_done(own_job)]
            futs.append(batcher.apply(rogue, rogue_updates, [(victim_job, env), (own_job, env)]))
            out = list(await asyncio.gather(*futs))
            assert (batcher.batches, batcher.messages) == (1, 21)
            return out
        finally:
            db.shutdown()

    with statements(s.conn) as seen:
        results = asyncio.run(batch())
    assert sum(1 for q in seen if q.lstrip().startswith("SELECT id, agent_id, attempt FROM jobs")) == 1
    assert all(r.foreign == [] for r in results[:20])
    assert [(a.job_id, a.status) for a in results[20].foreign] == [(victim_job, JobStatus.DONE)]
    assert {(a.job_id, a.status) for a in results[20].acks} == {
        (victim_job, JobStatus.DONE),
        (own_job, JobStatus.RUNNING),
        (own_job, JobStatus.DONE),
    }
    status = dict(s.conn.execute("SELECT id, status FROM jobs").fetchall())
    assert {JobStatus(v) for v in status.values()} == {JobStatus.DONE}  # the victim's by its own agent's report
    parts = s.conn.execute("SELECT job_id, body FROM records WHERE part = 'environment'").fetchall()
    assert [j for j, _ in parts] == [own_job]


def test_a_rogue_s_report_alone_in_a_batch_changes_nothing_of_its_victim(tmp_path: Path) -> None:
    """The victim's job is assigned to h0 and not reported yet: h1's RUNNING and DONE of it, alone in a batch,
    are acknowledged and foreign, and the job stays assigned, with no environment, run status or charge."""
    s, agents, jobs = _pool(tmp_path / "db.sqlite", 2, 1)
    before = _state(s), _usage(s)

    async def batch() -> UpdateResult:
        db = DbExecutor(s)
        try:
            return await ReportBatcher(s, db).apply(agents[1], _running_and_done(jobs[0]), [(jobs[0], {"os": "x"})])
        finally:
            db.shutdown()

    res = asyncio.run(batch())
    assert [(a.job_id, a.status) for a in res.foreign] == [(jobs[0], JobStatus.RUNNING), (jobs[0], JobStatus.DONE)]
    assert len(res.acks) == 2 and not res.freed and not res.changed_runs
    assert (_state(s), _usage(s)) == before
    assert s.conn.execute("SELECT count(*) FROM records").fetchone()[0] == 0


def test_a_batch_whose_optimistic_try_fails_is_applied_again_message_by_message_as_if_the_failing_ones_never_came(
    tmp_path: Path,
) -> None:
    """Through the batcher, 6 agents' RUNNING and DONE with their environments in one batch. The store refuses
    two messages: one its environment's write (before its reports), one its job's end. The batch, applied first
    with no savepoint per message, is undone and applied again with one per message: the two get their errors
    (no acknowledgement: their agents send them again) and nothing of theirs stays, environments included,
    while the store is left exactly as the four other messages alone leave it, charges and runs included."""
    s, agents, jobs = _pool(tmp_path / "db.sqlite", 6, 6)
    expected = _copy(s, tmp_path / "expected.sqlite")
    refused_env, refused_end = 1, 4
    s.conn.execute(
        f"CREATE TEMP TRIGGER env_refused BEFORE INSERT ON records WHEN NEW.job_id = '{jobs[refused_env]}'"
        " BEGIN SELECT RAISE(ABORT, 'environment refused by the test'); END"
    )
    s.conn.execute(
        f"CREATE TEMP TRIGGER end_refused BEFORE UPDATE OF status ON jobs WHEN NEW.id = '{jobs[refused_end]}'"
        " BEGIN SELECT RAISE(ABORT, 'end refused by the test'); END"
    )
    messages = [
        (a, _running_and_done(j), [(j, {"runtime": "null", "job": j})]) for a, j in zip(agents, jobs, strict=True)
    ]

    async def batch(
        store: Store, sent: Sequence[tuple[str, list[JobUpdate], list[tuple[str, dict[str, str]]]]]
    ) -> list[UpdateResult | BaseException]:
        db = DbExecutor(store)
        try:
            batcher = ReportBatcher(store, db)
            futs = [batcher.apply(a, ups, envs) for a, ups, envs in sent]
            out = list(await asyncio.gather(*futs, return_exceptions=True))
            assert (batcher.batches, batcher.messages) == (1, len(sent))
            return out
        finally:
            db.shutdown()

    with statements(s.conn) as seen:
        results = asyncio.run(batch(s, messages))
    assert [type(r) for r in results] == [
        sqlite3.IntegrityError if k in (refused_env, refused_end) else UpdateResult for k in range(6)
    ]
    assert "environment refused" in str(results[refused_env]) and "end refused" in str(results[refused_end])
    # The first try, undone once; the second, a savepoint per message.
    assert sum(1 for q in seen if q.startswith("ROLLBACK TO report_batch")) == 1
    assert sum(1 for q in seen if q.startswith("SAVEPOINT reports")) == 6

    kept = [m for k, m in enumerate(messages) if k not in (refused_env, refused_end)]
    assert all(isinstance(r, UpdateResult) for r in asyncio.run(batch(expected, kept)))
    assert (_state(s), _usage(s)) == (_state(expected), _usage(expected))
    records = "SELECT job_id, part, body FROM records ORDER BY job_id"
    assert s.conn.execute(records).fetchall() == expected.conn.execute(records).fetchall()
    assert {j for j, _, _ in s.conn.execute(records).fetchall()} == {
        j for k, j in enumerate(jobs) if k not in (refused_env, refused_end)
    }


def test_brief_jobs_written_together_still_fail_alone(tmp_path: Path) -> None:
    """Three agents each report their one job's RUNNING and DONE (written by one UPDATE for the batch); a
    trigger refuses the second job's end. The shared write fails, the batch is applied again message by
    message: the second message's result is the error and its job stays assigned; the others are done and
    charged."""
    s, agents, jobs = _pool(tmp_path / "db.sqlite", 3, 3)
    s.conn.execute(
        f"CREATE TEMP TRIGGER boom BEFORE UPDATE OF status ON jobs WHEN NEW.id = '{jobs[1]}'"
        " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
    )
    with statements(s.conn) as seen:
        results = s.apply_job_updates_many([(a, _running_and_done(j)) for a, j in zip(agents, jobs, strict=True)])
    assert sum(1 for q in seen if q.startswith("WITH v(_id")) == 1  # the shared write was tried
    assert isinstance(results[1], sqlite3.IntegrityError)
    assert all(isinstance(results[k], UpdateResult) for k in (0, 2))
    status = dict(s.conn.execute("SELECT id, status FROM jobs").fetchall())
    assert [JobStatus(status[j]) for j in jobs] == [JobStatus.DONE, JobStatus.ASSIGNED, JobStatus.DONE]
    charged = dict(s.conn.execute("SELECT id, usage_charged FROM jobs").fetchall())
    assert [charged[j] for j in jobs] == [1, 0, 1]


def test_a_row_moved_after_its_batch_read_it_is_not_written_from_that_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows a batch's messages name are read once, before any is applied, and its brief jobs written
    together from that read. Nothing in the batch's call moves a row it read but the messages themselves
    (store/jobs.py `_apply_messages`); were a read not what the row is all the same (here: the third
    agent's job failed, read as still assigned), the shared write finds it and the batch is applied again
    message by message, as the job now is: the third message's reports refused, nothing freed or charged
    for it, exactly as when each message comes alone; the other two are done."""
    s, agents, jobs = _pool(tmp_path / "db.sqlite", 3, 3)
    alone = _copy(s, tmp_path / "alone.sqlite")
    fail_third = (
        f"UPDATE jobs SET status = {int(JobStatus.FAILED)}, termination_reason = {int(TerminationReason.AGENT_LOST)},"
        f" finished_at = {NOW} WHERE id = ?"
    )
    messages = [(a, _running_and_done(j)) for a, j in zip(agents, jobs, strict=True)]
    read = s.jobs._batch_rows

    def read_before_the_move(c: sqlite3.Connection, reports: Sequence[tuple[str, Sequence[JobUpdate]]]) -> object:
        found = read(c, reports)
        assert found is not None
        found[jobs[2]][1][1] = int(JobStatus.ASSIGNED)  # the third job as it was before it failed
        return found

    s.conn.execute(fail_third, [jobs[2]])
    monkeypatch.setattr(s.jobs, "_batch_rows", read_before_the_move)
    with statements(s.conn) as seen:
        batched = s.apply_job_updates_many(messages)
    assert sum(1 for q in seen if q.startswith("ROLLBACK TO report_batch")) == 1  # applied again
    alone.conn.execute(fail_third, [jobs[2]])
    one_by_one = [alone.apply_job_updates_many([m])[0] for m in messages]

    def outcome(results: Sequence[UpdateResult | Exception]) -> list[tuple[bool, list[str]]]:
        return [(r.freed, sorted(r.changed_runs)) for r in results if isinstance(r, UpdateResult)]

    assert len(outcome(batched)) == 3 and outcome(batched) == outcome(one_by_one)
    assert _acks(batched) == _acks(one_by_one)
    assert (_state(s), _usage(s)) == (_state(alone), _usage(alone))
    status = dict(s.conn.execute("SELECT id, status FROM jobs").fetchall())
    assert [JobStatus(status[j]) for j in jobs] == [JobStatus.DONE, JobStatus.DONE, JobStatus.FAILED]
    alone.close()
