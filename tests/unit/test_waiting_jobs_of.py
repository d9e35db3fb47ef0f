"""`Store.waiting_jobs_of`: a requeue's read back by the jobs' keys (coordinator/engine.py `Engine._requeued`)
reads of them exactly what the whole read of the waiting jobs does, and nothing of jobs that no longer wait."""

from __future__ import annotations

from pathlib import Path

from dstack.coordinator.store import NewJob, Placement, Store
from dstack.protos.v1 import common_pb2


def test_the_named_waiting_jobs_read_as_the_whole_read_reads_them(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    spec = common_pb2.JobSpec(job_name="main", commands=["true"]).SerializeToString()
    ids = [s.create_run("u", "wf", b"", "", [], [NewJob("main", spec, 1.0, 0, 0, [])]).job_ids[0] for _ in range(1_200)]
    agent = s.register_agent("a", "tok", b"")
    s.agent_online(agent, b"", 2**62)
    s.apply_schedule([Placement(ids[0], agent, [])], [], [])  # no longer waiting
    whole = {w.id: w for w in s.waiting_jobs()}
    asked = [*ids[:1_100], "no-such-job"]  # more than one statement's worth of keys
    assert {w.id: w for w in s.waiting_jobs_of(asked)} == {j: whole[j] for j in asked if j in whole}
    assert ids[0] not in whole and len(whole) == 1_199
    assert s.waiting_jobs_of([]) == []
