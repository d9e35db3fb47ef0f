"""The scheduler's batched writes and its journal of changed jobs (coordinator/store/journal.py).

What a pass keeps between passes, updated only from the journal (what running jobs hold; statuses
within runs with dependants), must equal a full read after any sequence of writes, whichever path made
them: placements, agents' reports, stops, lease expiries, an admin removing an agent. A pass's
placements are written by one statement per 500 jobs (lifecycle.place_jobs): a job stopped between
the plan and the write must not be placed, and every run's status must be what one run at a time gives.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dstack.coordinator import lifecycle
from dstack.coordinator.holdings import Held, Holdings
from dstack.coordinator.model import JobStatus, JobUpdate, RunStatus, TerminationReason
from dstack.coordinator.store import NewJob, Placement, Store
from dstack.protos.v1 import common_pb2

JS = common_pb2.JobStatus


def _job(name: str, cpu: float = 1.0, deps: list[str] | None = None) -> NewJob:
    spec = common_pb2.JobSpec(job_name=name, commands=["true"]).SerializeToString()
    return NewJob(name, spec, cpu, 0, 0, deps or [])


def _held(store: Store) -> dict[str, tuple[str, str, float, int, tuple[int, ...], int | None]]:
    return {
        j.id: (j.agent_id, j.owner, j.cpu, j.memory, tuple(j.gpu_indices), j.started_at) for j in store.jobs_on_agents()
    }


def _kept(h: Holdings) -> dict[str, tuple[str, str, float, int, tuple[int, ...], int | None]]:
    return {j.job_id: (j.agent_id, j.owner, j.cpu, j.memory, j.gpu_indices, j.started_at) for j in h.jobs.values()}


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32))
def test_what_the_journal_keeps_equals_a_full_read_after_random_writes(
    tmp_path_factory: pytest.TempPathFactory, seed: int
) -> None:
    rng = random.Random(seed)
    s = Store(tmp_path_factory.mktemp("journal") / "db.sqlite")
    agents = [s.register_agent(f"h{i}", f"tok{i}", b"") for i in range(3)]
    for a in agents:
        s.agent_online(a, b"", 2**62)
    holdings = Holdings()
    statuses: dict[str, dict[tuple[str, str], JobStatus]] = {}  # run id -> its statuses, as a pass keeps them
    s.journal.start()
    names: list[str] = []
    sizes: dict[str, tuple[float, int]] = {}  # what each job asks for, as the engine's request says
    for _ in range(40):
        op = rng.random()
        waiting = [w for w in s.waiting_jobs()]
        on = list(_held(s))
        if op < 0.25 or not (waiting or on):
            jobs = [_job("a", rng.choice([0.0, 1.0, 2.0]))]
            if rng.random() < 0.4:
                jobs.append(_job("b", 1.0, ["a"]))
            run = s.create_run(rng.choice(["u1", "u2"]), "wf", b"", "", [], jobs)
            names.append(run.name)
            sizes.update((job_id, (j.cpu, j.memory)) for job_id, j in zip(run.job_ids, jobs, strict=True))
        elif op < 0.5 and waiting:
            # A pass: its placements are added by the engine itself (Engine._apply), not read back.
            picked = rng.sample(waiting, k=min(len(waiting), rng.randint(1, 4)))
            placed = s.apply_schedule(
                [Placement(w.id, rng.choice(agents), [rng.randint(0, 3)]) for w in picked], [], []
            )
            for assigned in placed:
                cpu, memory = sizes[assigned.job_id]
                holdings.add(
                    Held(
                        assigned.job_id,
                        assigned.agent_id,
                        assigned.owner,
                        cpu,
                        memory,
                        tuple(assigned.gpu_indices),
                        None,
                        "",
                    )
                )
        elif op < 0.75 and on:
            job_id = rng.choice(on)
            agent_id = _held(s)[job_id][0]
            status = rng.choice([JS.JOB_STATUS_RUNNING, JS.JOB_STATUS_DONE, JS.JOB_STATUS_FAILED])
            s.apply_job_updates(agent_id, [JobUpdate(job_id, status, time_ns=rng.randint(1, 10**18))])
        elif op < 0.85 and names:
            s.request_stop(rng.choice(names))
            on_now = _held(s)  # an agent confirms some stops
            for job_id in rng.sample(sorted(on_now), k=min(len(on_now), 2)):
                s.apply_job_updates(on_now[job_id][0], [JobUpdate(job_id, JS.JOB_STATUS_STOPPED)])
        elif op < 0.95:
            s.expire_leases(2**63 - 1 if rng.random() < 0.3 else 0)  # now and then every agent is lost
            for a in agents:
                s.agent_online(a, b"", 2**62)
        else:
            removed = rng.randrange(len(agents))
            s.remove_agent(f"h{removed}")
            agents[removed] = s.register_agent(f"h{removed}", f"tok{removed}-{rng.random()}", b"")
            s.agent_online(agents[removed], b"", 2**62)
        if rng.random() < 0.5:
            continue  # several writes between two passes
        changes = s.journal.drain()
        assert changes is not None
        for job_id in changes.off_agents:
            holdings.remove(job_id)
        for j in changes.on_agents:
            holdings.add(Held(j.id, j.agent_id, j.owner, j.cpu, j.memory, tuple(j.gpu_indices), j.started_at, ""))
        for run_id in changes.runs:
            statuses.pop(run_id, None)
        assert _kept(holdings) == _held(s)
        run_ids = [s.run_by_name(n).id for n in names]
        for run_id in rng.sample(run_ids, k=min(3, len(run_ids))):
            statuses.setdefault(run_id, s.dependency_statuses([run_id]))
        for run_id, kept in statuses.items():
            assert kept == s.dependency_statuses([run_id])


def test_a_journal_the_connection_lost_says_so_and_counts_again(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    s.journal.start()
    run = s.create_run("admin", "wf", b"", "", [], [_job("a")])
    s.conn.execute("DROP TABLE temp.job_changes")  # as a reopened connection has none
    assert s.journal.drain() is None  # the caller reads everything
    assert s.journal.drain() is not None
    s.request_stop(run.name)
    changes = s.journal.drain()
    assert changes is not None and changes.runs == {run.run_id} and changes.off_agents == list(run.job_ids)


def test_a_rolled_back_write_leaves_nothing_in_the_journal(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    run = s.create_run("admin", "wf", b"", "", [], [_job("a")])
    s.journal.start()
    with pytest.raises(RuntimeError), s.tx() as c:
        lifecycle.move_job(c, lifecycle.STOP_WAITING, run.job_ids[0], at=1)
        raise RuntimeError("the write fails after the move")
    changes = s.journal.drain()
    assert changes is not None and not changes.runs


def test_a_batched_pass_places_only_jobs_still_waiting_and_derives_each_runs_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1,200 placements (three statements); 50 of the jobs were stopped between the plan and the write,
    and 30 runs have a second job that already failed."""
    s = Store(tmp_path / "db.sqlite")
    agent_id = s.register_agent("h", "tok", b"")
    runs = [s.create_run("admin", "wf", b"", "", [], [_job("a"), _job("b")]) for _ in range(600)]
    stopped = {r.job_ids[0] for r in runs[:50]}
    for r in runs[:50]:
        s.request_stop(r.name)
    for r in runs[100:130]:
        s.apply_schedule([], [], [(r.job_ids[1], "no agent fits")])
    placements = [Placement(j, agent_id, [k % 8], "") for k, r in enumerate(runs) for j in r.job_ids]
    placements = [p for p in placements if not any(p.job_id == r.job_ids[1] for r in runs[100:130])]
    with caplog.at_level(logging.INFO, logger="dstack.coordinator"):
        assigned = s.apply_schedule(placements, [], [])
    assert {a.job_id for a in assigned} == {p.job_id for p in placements} - {j for r in runs[:50] for j in r.job_ids}
    assert all(f"job {j}: refused transition stopped -> assigned (place, by scheduler)" in caplog.text for j in stopped)
    by_run = s.jobs_of_runs([r.run_id for r in runs])
    gpus = {p.job_id: p.gpu_indices for p in placements}
    for r in runs:
        jobs = by_run[r.run_id]
        run = s.run_by_name(r.name)
        expected = lifecycle.derive_run_status(
            [(j.status, j.termination_reason, j.message, j.job_name) for j in sorted(jobs, key=lambda j: j.job_name)]
        )[0]
        assert run.status == expected, r.name
        for j in jobs:
            if j.status == JobStatus.ASSIGNED:
                assert (j.agent_id, j.gpu_indices) == (agent_id, gpus[j.id])
    assert s.run_by_name(runs[0].name).status == RunStatus.STOPPED
    assert s.run_by_name(runs[100].name).status == RunStatus.RUNNING  # b failed, a placed
    assert s.run_by_name(runs[300].name).status == RunStatus.RUNNING


def test_runs_refreshed_in_a_batch_move_as_one_at_a_time_does(tmp_path: Path) -> None:
    """refresh_run_statuses over runs whose jobs are in random states gives every run the status, reason,
    message and finish `refresh_run_status` gives it (a run that finishes done gets its tag)."""
    rng = random.Random(7)
    stores = [Store(tmp_path / f"{k}.sqlite", clock=lambda: 1_000) for k in range(2)]
    states = [JobStatus.SUBMITTED, JobStatus.PENDING, JobStatus.ASSIGNED, JobStatus.RUNNING, JobStatus.DONE]
    states += [JobStatus.FAILED, JobStatus.STOPPED]
    # Per run, each job's (status, finished_at): distinct finish times, so "the first to fail" is one job.
    plan = []
    for _ in range(300):
        n = rng.randint(1, 3)
        plan.append(list(zip([rng.choice(states) for _ in range(n)], rng.sample(range(1, 100), n), strict=True)))
    ids: list[list[str]] = [[], []]
    for s, mine in zip(stores, ids, strict=True):
        for k, jobs in enumerate(plan):
            run = s.create_run(
                "admin", "wf", b"", "", [], [_job(f"j{i}") for i in range(len(jobs))], tag_on_done=f"t{k}"
            )
            mine.append(run.run_id)
            with s.tx() as c:  # the jobs' states as other writers left them (the test sets them directly)
                for i, (job_id, (status, finished_at)) in enumerate(zip(run.job_ids, jobs, strict=True)):
                    c.execute(
                        "UPDATE jobs SET status = ?, termination_reason = ?, message = ?, finished_at = ? WHERE id = ?",
                        [int(status), int(TerminationReason.EXIT_CODE), f"m{i}", finished_at, job_id],
                    )
    with stores[0].tx() as c:
        lifecycle.refresh_run_statuses(c, ids[0], 1_000)
    with stores[1].tx() as c:
        for run_id in ids[1]:
            lifecycle.refresh_run_status(c, run_id, 1_000)
    read = [
        [
            s.conn.execute(
                "SELECT status, termination_reason, message, finished_at, tag_on_done FROM runs WHERE id = ?", [run_id]
            ).fetchone()
            for run_id in mine
        ]
        for s, mine in zip(stores, ids, strict=True)
    ]
    assert read[0] == read[1]
    assert {r[0] for r in read[0]} >= {RunStatus.DONE, RunStatus.FAILED, RunStatus.RUNNING, RunStatus.PENDING}
    tags = [s.conn.execute("SELECT repository, name FROM tags ORDER BY name").fetchall() for s in stores]
    assert tags[0] == tags[1] and tags[0]


def test_an_agents_row_is_noted_when_a_pass_reads_something_new_in_it_and_not_for_a_heartbeat(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    agent_id = s.register_agent("h", "tok", b"")
    s.agent_online(agent_id, b"inv-1", 2**62)
    s.journal.start()

    def agents_changed() -> bool:
        changes = s.journal.drain()
        assert changes is not None
        return changes.agents

    s.heartbeat(agent_id, None, 2**62)
    s.heartbeat(agent_id, b"inv-1", 2**62)  # the same inventory again
    assert not agents_changed()
    s.heartbeat(agent_id, b"inv-2", 2**62)  # a disk filled up, a GPU went away
    assert agents_changed()
    s.expire_leases(2**63 - 1)  # lost: no longer online
    assert agents_changed()
    assert not agents_changed()
    s.register_agent("h2", "tok2", b"")
    assert agents_changed()
