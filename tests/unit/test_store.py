from __future__ import annotations

import sqlite3
from pathlib import Path

from coordinator.store import SCHEMA_VERSION, Store
from coordinator.store.db import NewJob, Placement
from protos.v1 import agent_pb2, common_pb2

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
    assert run["status"] == common_pb2.RUN_STATUS_SUBMITTED
    agent_id = s.register_agent("h", "tok", b"")
    s.agent_online(agent_id, b"", 2**62)
    jobs = {j["job_name"]: j["id"] for j in s.jobs_of_runs([run["id"]])[run["id"]]}
    s.apply_schedule([Placement(jobs["a"], agent_id, [])], {jobs["b"]: "waiting for a"}, [])
    assert s.run_by_name(name)["status"] == common_pb2.RUN_STATUS_RUNNING
    res = s.apply_job_updates(
        agent_id, [agent_pb2.JobUpdate(job_id=jobs["a"], status=JS.JOB_STATUS_FAILED, message="exited with code 1")]
    )
    assert res.freed and len(res.acks) == 1
    rows = {j["job_name"]: j for j in s.jobs_of_runs([run["id"]])[run["id"]]}
    assert rows["b"]["status"] == JS.JOB_STATUS_FAILED
    assert rows["b"]["message"] == "dependency 'a' failed"
    assert s.run_by_name(name)["status"] == common_pb2.RUN_STATUS_FAILED


def test_stale_updates_are_ignored_but_acked(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    name = s.create_run("admin", "wf", b"", "", [], [job("a")]).name
    run = s.run_by_name(name)
    jid = s.jobs_of_runs([run["id"]])[run["id"]][0]["id"]
    agent_id = s.register_agent("h", "tok", b"")
    s.apply_schedule([Placement(jid, agent_id, [])], {}, [])
    s.apply_job_updates(agent_id, [agent_pb2.JobUpdate(job_id=jid, status=JS.JOB_STATUS_DONE)])
    res = s.apply_job_updates(agent_id, [agent_pb2.JobUpdate(job_id=jid, status=JS.JOB_STATUS_RUNNING)])
    assert len(res.acks) == 1 and not res.changed_runs
    assert s.run_by_name(name)["status"] == common_pb2.RUN_STATUS_DONE


def test_logs_are_idempotent(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    lines = [common_pb2.LogLine(seq=i, text=str(i)) for i in range(1, 4)]
    s.insert_logs([agent_pb2.LogBatch(job_id="j", lines=lines)])
    s.insert_logs([agent_pb2.LogBatch(job_id="j", lines=lines[1:])])  # a resend after reconnect
    assert [ln.text for ln in s.read_logs("j", 0, 100)] == ["1", "2", "3"]
    assert s.log_positions(["j"]) == {"j": 3}


def test_dependants_fail_when_the_coordinator_fails_a_job(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    name = s.create_run("admin", "wf", b"", "", [], [job("a"), job("b", ["a"]), job("c", ["b"])]).name
    run = s.run_by_name(name)
    jobs = {j["job_name"]: j["id"] for j in s.jobs_of_runs([run["id"]])[run["id"]]}
    agent_id = s.register_agent("h", "tok", b"")
    s.agent_online(agent_id, b"", 0)
    s.apply_schedule([Placement(jobs["a"], agent_id, [])], [jobs["b"], jobs["c"]], [])
    assert s.expire_leases(now=1) == [agent_id]  # the lease ran out: a fails with "agent lost"
    rows = {j["job_name"]: j for j in s.jobs_of_runs([run["id"]])[run["id"]]}
    assert rows["a"]["message"] == "agent lost"
    assert rows["b"]["status"] == rows["c"]["status"] == JS.JOB_STATUS_FAILED
    assert rows["c"]["message"] == "dependency 'b' failed"
    assert s.run_by_name(name)["status"] == common_pb2.RUN_STATUS_FAILED


def test_dependants_fail_when_a_job_is_unschedulable(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    name = s.create_run("admin", "wf", b"", "", [], [job("a"), job("b", ["a"])]).name
    run = s.run_by_name(name)
    jobs = {j["job_name"]: j["id"] for j in s.jobs_of_runs([run["id"]])[run["id"]]}
    s.apply_schedule([], [jobs["b"]], [(jobs["a"], 5, "needs 8 GPUs; the largest agent has 0 GPUs")])
    assert s.run_by_name(name)["status"] == common_pb2.RUN_STATUS_FAILED


def test_pulling_comes_between_assigned_and_running(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    name = s.create_run("admin", "wf", b"", "", [], [job("a")]).name
    run = s.run_by_name(name)
    jid = s.jobs_of_runs([run["id"]])[run["id"]][0]["id"]
    agent_id = s.register_agent("h", "tok", b"")
    s.apply_schedule([Placement(jid, agent_id, [0])], {}, [])

    def update(status: common_pb2.JobStatus.ValueType) -> None:
        s.apply_job_updates(agent_id, [agent_pb2.JobUpdate(job_id=jid, status=status)])

    update(JS.JOB_STATUS_PULLING)
    assert s.run_by_name(name)["status"] == common_pb2.RUN_STATUS_PULLING
    assert s.active_allocations()[0]["gpu_indices"] == "[0]"  # a pulling job holds its GPUs
    assert [j for j, _ in s.request_stop(name)] == [jid]  # and is stopped on its agent
    update(JS.JOB_STATUS_RUNNING)
    assert s.run_by_name(name)["status"] == common_pb2.RUN_STATUS_RUNNING
    update(JS.JOB_STATUS_PULLING)  # late, out of order: ignored
    assert s.run_by_name(name)["status"] == common_pb2.RUN_STATUS_RUNNING
