"""The log store's bounds: a job name that cannot be a key does not stop archiving for other jobs, and the
per-job quota drops lines past it with one marker line, once, also across a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dstack.coordinator.artifacts import Artifacts
from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.model import JobUpdate, LogBatch, LogLine, LogStream
from dstack.coordinator.retention import Retention
from dstack.coordinator.store import NewJob, Placement, Store
from dstack.coordinator.store.executor import DbExecutor
from dstack.coordinator.store.logs import quota_marker
from dstack.protos.v1 import common_pb2
from dstack.storage import LocalStore

JS = common_pb2.JobStatus


def finished_run(store: Store, names: list[str], lines: int) -> dict[str, str]:
    """A run of finished jobs `names` (stored as given, as a database from before names were checked
    may hold them), each with `lines` lines; job name -> id."""
    new = [NewJob(n, common_pb2.JobSpec(job_name=n).SerializeToString(), 0, 0, 0, []) for n in names]
    run = store.run_by_name(store.create_run("admin", "wf", b"", "", [], new).name)
    jobs = {j.job_name: j.id for j in store.jobs_of_runs([run.id])[run.id]}
    agent = store.register_agent(f"h-{run.name}", f"tok-{run.name}", b"")
    store.apply_schedule([Placement(j, agent, []) for j in jobs.values()], {}, [])
    for job_id in jobs.values():
        store.insert_logs([LogBatch(job_id, [LogLine(s, 1, 0, f"line {s}") for s in range(1, lines + 1)])])
    store.apply_job_updates(agent, [JobUpdate(job_id=j, status=JS.JOB_STATUS_DONE) for j in jobs.values()])
    return jobs


def test_a_job_named_dotdot_does_not_stop_archiving_for_every_run(tmp_path: Path) -> None:
    config = CoordinatorConfig(
        state_dir=tmp_path, listen="", storage_url="", admin_token="a", join_token="j", archive_after_s=0.0
    )
    store = Store(config.db_path)
    db = DbExecutor(store)
    try:
        # More bad jobs than one batch of the archiver: it must move past all of them.
        bad = [finished_run(store, ["..", "."], 3) for _ in range(60)]
        good = finished_run(store, ["ok"], 20_000)
        objects = LocalStore(tmp_path / "objects")
        retention = Retention(config, store, db, Artifacts(objects))
        assert asyncio.run(retention.pass_once()) == 1
        assert asyncio.run(retention.pass_once()) == 0  # and it returns, with nothing left it can archive
        (key,) = objects.list_prefix("runs")
        assert key.endswith("/ok/logs.jsonl.gz")
        assert store.read_logs(good["ok"], 0, 10) == []  # moved to the archive
        assert [ln.text for ln in store.read_logs(bad[0][".."], 0, 10)] == ["line 1", "line 2", "line 3"]
    finally:
        db.shutdown()
        store.close()


def test_the_quota_drops_lines_with_one_marker_also_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    store = Store(path)
    (job_id,) = finished_run(store, ["main"], 0).values()
    store.logs.max_bytes = 100

    def send(first: int, count: int) -> None:
        lines = [LogLine(s, 1, 0, "x" * 9) for s in range(first, first + count)]
        acks = store.insert_logs([LogBatch(job_id, lines)])
        assert acks[0].seq == first + count - 1  # acknowledged, kept or not: the agent must not resend

    send(1, 5)
    send(1, 5)  # resent after a reconnect: stored once, counted once
    send(6, 10)  # crosses: lines 6..11 kept (99 bytes in all), 12 becomes the marker, the rest dropped
    send(16, 10)
    texts = [ln.text for ln in store.read_logs(job_id, 0, 1000)]
    assert texts == ["x" * 9] * 11 + [quota_marker(100)]
    assert store.read_logs(job_id, 0, 1000)[-1].stream == LogStream.SYSTEM
    store.close()
    again = Store(path)  # a restart: the usage is counted again from the database
    again.logs.max_bytes = 100
    lines = [LogLine(s, 1, 0, "y") for s in range(26, 30)]
    again.insert_logs([LogBatch(job_id, lines)])
    assert [ln.text for ln in again.read_logs(job_id, 0, 1000)].count(quota_marker(100)) == 1
    assert len(again.read_logs(job_id, 0, 1000)) == 12
    again.close()
