"""The SDK's `submit_many` against real coordinators: a batch that a database fault undoes is reported
run by run (which were submitted, which not and why), and a coordinator without SubmitRuns (UNIMPLEMENTED)
gets the runs one by one.

The fault is a trigger in the coordinator's own database (written beside the running process, as a disk
error would strike): the insert of one run of the batch fails with a real SQLite error."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from dstack.api import Client, PartlySubmitted, RequestRejected, RunStatus
from dstack.cli.client import SubmitRunsUnsupported
from tests.conftest import Cluster, write_project

pytestmark = pytest.mark.integration

WORKFLOWS = """
workflows:
  - name: noop
    provider: bash
    commands: ["echo args=${{ run.args }}"]
"""


def sdk(cluster: Cluster) -> Client:
    return Client(address=cluster.address, token=cluster.admin_token, ca_file=cluster.ca_file, timeout=60)


def database(cluster: Cluster, sql: str) -> None:
    with closing(sqlite3.connect(cluster.tmp / "server" / "coordinator.db", timeout=30)) as db:
        db.execute(sql)
        db.commit()


def test_a_fault_in_a_batch_is_reported_run_by_run_and_a_second_try_submits_each_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.start_coordinator("--max-queued-per-user", "0", "--max-submissions-per-minute", "0")
    root = write_project(tmp_path / "p", WORKFLOWS)  # no agent: every run stays queued
    database(
        cluster,
        "CREATE TRIGGER inject_fault BEFORE INSERT ON runs WHEN NEW.args LIKE '%boom%'"
        " BEGIN SELECT RAISE(ABORT, 'injected fault: disk I/O error'); END",
    )
    args = [["a"], ["b"], ["c"], ["boom"], ["d"]]
    with sdk(cluster) as client:
        with pytest.raises(PartlySubmitted) as e:
            client.runs.submit_many("noop", args, repo=root)
        # The first run goes alone (it uploads the code) and is stored; the batch of the other four is
        # undone as a whole by the fault at its third run: none of them is stored, and the error says so.
        err = e.value
        assert [r is not None for r in err.runs] == [True, False, False, False, False]
        assert err.reasons[0] == ""
        for reason in err.reasons[1:]:
            assert reason.startswith("not stored: "), reason
            assert "while storing run 3 of the 4 in this call (injected fault: disk I/O error)" in reason
            assert "none of the 4 runs was stored" in reason
        assert "1 of 5 runs submitted" in str(err) and isinstance(err, RequestRejected)
        listed = client.runs.list(all=True)
        assert [r.name for r in listed] == [err.runs[0].name]  # type: ignore[union-attr]
        # Sending the ones not stored again, once the fault is gone, submits each once.
        database(cluster, "DROP TRIGGER inject_fault")
        again = client.runs.submit_many("noop", args[1:], repo=root)
        assert len(again) == 4
        assert len(client.runs.list(all=True)) == 5


def test_submit_many_falls_back_to_one_call_per_run_on_a_coordinator_without_submit_runs(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.coordinator_module = "tests.old_coordinator"
    cluster.start_coordinator("--max-queued-per-user", "4", "--max-submissions-per-minute", "0")
    root = write_project(tmp_path / "p", WORKFLOWS)
    with sdk(cluster) as client:
        with pytest.raises(SubmitRunsUnsupported):  # SubmitRuns itself: the stand-in really is without it
            client._channel.submit_runs([])
    with sdk(cluster) as client:
        # Six runs, a queued-jobs limit of 4 (no agent yet): four submitted, two refused, each said.
        with pytest.raises(PartlySubmitted) as e:
            client.runs.submit_many("noop", [[str(i)] for i in range(6)], repo=root, workers=3)
        err = e.value
        assert sum(r is not None for r in err.runs) == 4
        refused = [x for x in err.reasons if x]
        assert len(refused) == 2 and all("the limit is 4 (--max-queued-per-user)" in x for x in refused), refused
        assert len(client.runs.list(all=True)) == 4
        # Within the limit, every run is submitted, and they run.
        cluster.start_agent()
        done = client.runs.wait(err.submitted, timeout=120)
        assert done == [RunStatus.DONE] * 4
        runs = client.runs.submit_many("noop", [["x"], ["y"], ["z"]], repo=root, workers=2)
        assert client.runs.wait(runs, timeout=120) == [RunStatus.DONE] * 3
        assert [next(r.logs()) for r in runs] == ["args=x", "args=y", "args=z"]
