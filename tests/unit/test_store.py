from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dstack.coordinator.errors import AlreadyExists
from dstack.coordinator.model import JobStatus, JobUpdate, LogBatch, LogLine, RunStatus
from dstack.coordinator.store import SCHEMA_VERSION, NewJob, Placement, Store
from dstack.protos.v1 import common_pb2

JS = common_pb2.JobStatus


def job(name: str, deps: list[str] | None = None) -> NewJob:
    spec = common_pb2.JobSpec(job_name=name, commands=["true"]).SerializeToString()
    return NewJob(name, spec, 0, 0, 0, deps or [])


def test_schema_version_and_reopen(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    s.close()
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    Store(tmp_path / "db.sqlite").close()  # migrating again is a no-op


def test_job_lifecycle_and_run_status(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    name = s.create_run("admin", "wf", b"", "", [], [job("a"), job("b", ["a"])]).name
    run = s.run_by_name(name)
    assert run.status == RunStatus.SUBMITTED
    agent_id = s.register_agent("h", "tok", b"")
    s.agent_online(agent_id, b"", 2**62)
    jobs = {j.job_name: j.id for j in s.jobs_of_runs([run.id])[run.id]}
    s.apply_schedule([Placement(jobs["a"], agent_id, [])], {jobs["b"]: "waiting for a"}, [])
    assert s.run_by_name(name).status == RunStatus.RUNNING
    res = s.apply_job_updates(
        agent_id, [JobUpdate(job_id=jobs["a"], status=JS.JOB_STATUS_FAILED, message="exited with code 1")]
    )
    assert res.freed and len(res.acks) == 1
    rows = {j.job_name: j for j in s.jobs_of_runs([run.id])[run.id]}
    assert rows["b"].status == JobStatus.FAILED
    assert rows["b"].message == "dependency 'a' failed"
    assert s.run_by_name(name).status == RunStatus.FAILED


def test_stale_updates_are_ignored_but_acked(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    name = s.create_run("admin", "wf", b"", "", [], [job("a")]).name
    run = s.run_by_name(name)
    jid = s.jobs_of_runs([run.id])[run.id][0].id
    agent_id = s.register_agent("h", "tok", b"")
    s.apply_schedule([Placement(jid, agent_id, [])], {}, [])
    s.apply_job_updates(agent_id, [JobUpdate(job_id=jid, status=JS.JOB_STATUS_DONE)])
    res = s.apply_job_updates(agent_id, [JobUpdate(job_id=jid, status=JS.JOB_STATUS_RUNNING)])
    assert len(res.acks) == 1 and not res.changed_runs
    assert s.run_by_name(name).status == RunStatus.DONE


def test_logs_are_idempotent(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    lines = [LogLine(seq=i, stream=1, time_ns=0, text=str(i)) for i in range(1, 4)]
    s.insert_logs([LogBatch(job_id="j", lines=lines)])
    s.insert_logs([LogBatch(job_id="j", lines=lines[1:])])  # a resend after reconnect
    assert [ln.text for ln in s.read_logs("j", 0, 100)] == ["1", "2", "3"]
    assert s.log_positions(["j"]) == {"j": 3}


def test_dependants_fail_when_the_coordinator_fails_a_job(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    name = s.create_run("admin", "wf", b"", "", [], [job("a"), job("b", ["a"]), job("c", ["b"])]).name
    run = s.run_by_name(name)
    jobs = {j.job_name: j.id for j in s.jobs_of_runs([run.id])[run.id]}
    agent_id = s.register_agent("h", "tok", b"")
    s.agent_online(agent_id, b"", 0)
    s.apply_schedule([Placement(jobs["a"], agent_id, [])], [jobs["b"], jobs["c"]], [])
    assert s.expire_leases(now=1) == [agent_id]  # the lease ran out: a fails with "agent lost"
    rows = {j.job_name: j for j in s.jobs_of_runs([run.id])[run.id]}
    assert rows["a"].message == "agent lost"
    assert rows["b"].status == rows["c"].status == JobStatus.FAILED
    assert rows["c"].message == "dependency 'b' failed"
    assert s.run_by_name(name).status == RunStatus.FAILED


def test_dependants_fail_when_a_job_is_unschedulable(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    name = s.create_run("admin", "wf", b"", "", [], [job("a"), job("b", ["a"])]).name
    run = s.run_by_name(name)
    jobs = {j.job_name: j.id for j in s.jobs_of_runs([run.id])[run.id]}
    s.apply_schedule([], [jobs["b"]], [(jobs["a"], "needs 8 GPUs; the largest agent has 0 GPUs")])
    assert s.run_by_name(name).status == RunStatus.FAILED


def test_pulling_comes_between_assigned_and_running(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    name = s.create_run("admin", "wf", b"", "", [], [job("a")]).name
    run = s.run_by_name(name)
    jid = s.jobs_of_runs([run.id])[run.id][0].id
    agent_id = s.register_agent("h", "tok", b"")
    s.apply_schedule([Placement(jid, agent_id, [0])], {}, [])

    def update(status: common_pb2.JobStatus.ValueType) -> None:
        s.apply_job_updates(agent_id, [JobUpdate(job_id=jid, status=status)])

    update(JS.JOB_STATUS_PULLING)
    assert s.run_by_name(name).status == RunStatus.PULLING
    assert s.active_allocations()[0].gpu_indices == [0]  # a pulling job holds its GPUs
    assert [j for j, _ in s.request_stop(name)] == [jid]  # and is stopped on its agent
    update(JS.JOB_STATUS_RUNNING)
    assert s.run_by_name(name).status == RunStatus.RUNNING
    update(JS.JOB_STATUS_PULLING)  # late, out of order: ignored
    assert s.run_by_name(name).status == RunStatus.RUNNING


def inventory(host: str) -> bytes:
    return common_pb2.Inventory(hostname=host).SerializeToString()


def test_an_agent_name_held_by_an_online_agent_is_refused(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    first = s.register_agent("gpu-1", "tok-1", inventory("host-a"))
    s.agent_online(first, inventory("host-a"), 2**62)
    with pytest.raises(AlreadyExists) as e:
        s.register_agent("gpu-1", "tok-2", inventory("host-b"))
    assert str(e.value) == "an agent named gpu-1 is already online (host host-a); choose another --name"
    assert [(a.id, a.status) for a in s.list_agents()] == [(first, "online")]
    assert s.agent_by_token("tok-2") is None
    # The agent itself reconnects with its own credentials, as always.
    agent = s.agent_by_token("tok-1")
    assert agent is not None and agent.id == first


def test_a_new_agent_takes_the_name_of_a_lost_one(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    old = s.register_agent("gpu-1", "tok-old", b"")
    s.agent_online(old, b"", 0)
    assert s.expire_leases(now=1) == [old]
    new = s.register_agent("gpu-1", "tok-new", b"")
    s.agent_online(new, b"", 2**62)
    assert [(a.id, a.name, a.status) for a in s.list_agents()] == [(new, "gpu-1", "online")]
    assert s.agent_by_token("tok-old") is None  # the old agent can no longer come back as gpu-1
    assert s.conn.execute("SELECT COUNT(*) FROM agents").fetchone()[0] == 1  # no job refers to it: deleted


def test_a_replaced_agent_that_ran_jobs_stays_only_for_their_history(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    name = s.create_run("admin", "wf", b"", "", [], [job("a")]).name
    run = s.run_by_name(name)
    jid = s.jobs_of_runs([run.id])[run.id][0].id
    old = s.register_agent("gpu-1", "tok-old", b"")
    s.agent_online(old, b"", 0)
    s.apply_schedule([Placement(jid, old, [])], {}, [])
    assert s.expire_leases(now=1) == [old]
    new = s.register_agent("gpu-1", "tok-new", b"")
    s.agent_online(new, b"", 2**62)
    assert [a.id for a in s.list_agents()] == [new]
    assert s.jobs_of_runs([run.id])[run.id][0].agent_name == "gpu-1"  # where the job ran
    s.agent_online(old, b"", 2**62)  # a stream authenticated just before the take-over: stays retired
    assert [a.id for a in s.list_agents()] == [new]


def test_lost_agents_are_forgotten_after_the_period(tmp_path: Path) -> None:
    now = [1_000]
    s = Store(tmp_path / "db.sqlite", clock=lambda: now[0])
    lost = s.register_agent("lost", "tok-1", b"")
    s.agent_online(lost, b"", 2_000)  # heard from at 1000
    online = s.register_agent("online", "tok-2", b"")
    s.agent_online(online, b"", 2**62)
    never = s.register_agent("never-connected", "tok-3", b"")
    assert s.expire_leases(now=3_000) == [lost]
    # When each was last heard from; how long ago is timed by the engine on the monotonic clock.
    assert sorted(s.unused_agents()) == sorted([(lost, 1_000), (never, 1_000)])  # never: since it registered
    assert sorted(s.forget_agents([lost, never, online])) == sorted([lost, never])  # online is in use: stays
    assert [a.name for a in s.list_agents()] == ["online"]
    assert s.agent_by_token("tok-1") is None
    s.register_agent("lost", "tok-4", b"")  # the name is free


def test_migration_5_keeps_one_agent_per_name(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute("DROP INDEX agents_pool_name")  # as a database at version 4 was: without it
    rows = [  # id, name, status, last_heartbeat, registered_at
        ("a-lost", "a", "lost", 50, 1),
        ("a-online-old", "a", "online", 10, 2),
        ("a-online", "a", "online", 20, 3),
        ("b-old", "b", "lost", 5, 1),
        ("b-new", "b", "lost", 5, 2),
        ("c", "c", "online", 1, 1),
    ]
    conn.executemany(
        "INSERT INTO agents (id, name, token_hash, status, last_heartbeat, registered_at) VALUES (?, ?, ?, ?, ?, ?)",
        [(i, n, f"hash-{i}", st, hb, reg) for i, n, st, hb, reg in rows],
    )
    conn.execute("PRAGMA user_version = 4")
    conn.commit()
    conn.close()
    s = Store(path)
    assert [(a.name, a.id) for a in s.list_agents()] == [("a", "a-online"), ("b", "b-new"), ("c", "c")]
    retired = s.conn.execute("SELECT id, token_hash FROM agents WHERE status = 'retired' ORDER BY id").fetchall()
    assert retired == [("a-lost", None), ("a-online-old", None), ("b-old", None)]
    with pytest.raises(sqlite3.IntegrityError):  # the schema itself keeps names unique from now on
        s.conn.execute("UPDATE agents SET status = 'lost' WHERE id = 'b-old'")
