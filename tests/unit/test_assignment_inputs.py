"""What an assignment carries (coordinator/store/jobs.py: apply_schedule, assignments_for_agent): a first
attempt nothing to resume from, a later one its earlier attempts' `mount: true` files (the checkpoint)."""

from __future__ import annotations

from pathlib import Path

from dstack.coordinator.store import NewJob, Placement, Store
from dstack.protos.v1 import common_pb2


def _store_with_job(tmp_path: Path) -> tuple[Store, str, str]:
    s = Store(tmp_path / "state.db")
    spec = common_pb2.JobSpec(job_name="train", workflow="w")
    spec.artifacts.add(path="ckpt", mount=True)
    created = s.create_run("u", "w", b"", "", [], [NewJob("train", spec.SerializeToString(), 0, 0, 0, [])])
    agent = s.register_agent("a0", "token0", common_pb2.Inventory().SerializeToString())
    return s, created.job_ids[0], agent


def test_a_first_attempt_starts_with_nothing_to_resume(tmp_path: Path) -> None:
    s, job_id, agent = _store_with_job(tmp_path)
    (a,) = s.apply_schedule([Placement(job_id, agent, [])], [], [])
    assert (a.job_id, a.attempt, a.inputs) == (job_id, 1, [])
    assert a.run_name and a.owner == "u"  # the run's columns, read with the job's in one query


def test_a_later_attempt_starts_with_its_checkpoint(tmp_path: Path) -> None:
    s, job_id, agent = _store_with_job(tmp_path)
    # Attempt 1 saved a file in its mounted folder, then the job went back to waiting as attempt 2.
    s.conn.execute(
        "INSERT INTO artifacts (job_id, path, size, sha256) VALUES (?, ?, ?, ?)", [job_id, "ckpt/step", 3, "ab" * 32]
    )
    s.conn.execute("UPDATE jobs SET attempt = 2 WHERE id = ?", [job_id])
    s.conn.commit()
    (a,) = s.apply_schedule([Placement(job_id, agent, [])], [], [])
    assert a.attempt == 2
    (checkpoint,) = a.inputs
    assert [(f.path, f.size) for f in checkpoint.files] == [("ckpt/step", 3)]
    (again,) = s.assignments_for_agent(agent, [job_id])  # a reconnecting agent is sent the same
    assert again.inputs == a.inputs
