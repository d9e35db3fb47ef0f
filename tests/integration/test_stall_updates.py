"""Many jobs ending on one agent while the coordinator's store stalls: its heartbeats are still read and
acknowledged, so the agent keeps its lease and stops no job (self-fence), and is not lost.

The coordinator reads an agent's stream in order and holds at most 16 of its messages read but not handled
(coordinator/services/agent.py); a heartbeat behind more waits unread. Log batches in flight were bounded
(8), job updates were not: jobs ending one by one sent one message each, and with the store stalled they
filled those 16 places (issue 16's known gap). Now the agent keeps at most 4 messages of updates in flight
and sends the rest together (agent/outbox.py, `inflight_updates`).

Attack, with real processes: another process holds the coordinator's database write lock (as a backup
tool or a stray `sqlite3` shell would) for longer than the agent's fence deadline, while 20 jobs on one
agent end one after another, and one more job keeps running: the agent must not stop it.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from dstack.api import Client, RunStatus
from tests.conftest import Cluster, wait_for, write_project

pytestmark = pytest.mark.integration

JOBS = 20
# Below the store's busy_timeout (5 s, coordinator/store/base.py): its writes wait for the lock, none fails.
HOLD_S = 4.7


def test_jobs_ending_one_by_one_while_the_store_stalls_do_not_hold_back_the_heartbeats(
    cluster: Cluster, tmp_path: Path
) -> None:
    # The agent stops its jobs 3 s after sending its last acknowledged heartbeat (lease 2.5 s + margin 1 s
    # - kill time 0.5 s): the lock is held longer than that.
    cluster.self_fence = "on"
    cluster.lease_timeout, cluster.fence_margin, cluster.fence_kill, cluster.heartbeat = 2.5, 1.0, 0.5, 0.25
    cluster.start_coordinator()
    agent = cluster.start_agent("a", "--simulate-gpus", f"{JOBS + 1}xA100-80GB")
    gates = tmp_path / "gates"
    gates.mkdir()
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: hold
            provider: bash
            commands:
              - bash gate.sh ${{ run.args }}
            resources:
              gpu: 1
        """,
        {"gate.sh": f'while [ ! -e {gates}/"$1" ]; do sleep 0.05; done\n'},
    )
    with Client(address=cluster.address, token=cluster.admin_token, ca_file=cluster.ca_file, timeout=60) as client:
        # Job JOBS keeps running through the stall: the one the agent would stop.
        runs = client.runs.submit_many("hold", [[str(k)] for k in range(JOBS + 1)], repo=project)
        names = [r.name for r in runs]

        def all_running() -> bool:
            return sum(r["status"] == "running" for r in cluster.runs() if r["name"] in names) == JOBS + 1

        wait_for(all_running, timeout=120, what=f"{JOBS + 1} jobs running on the agent")

        with closing(sqlite3.connect(cluster.tmp / "server" / "coordinator.db", timeout=30)) as db:
            db.execute("BEGIN IMMEDIATE")  # the coordinator's writes wait from here
            held_at = time.monotonic()
            for k in range(JOBS):  # one by one: each job's end is an update message of its own
                (gates / str(k)).touch()
                time.sleep(0.05)
            time.sleep(max(0.0, HOLD_S - (time.monotonic() - held_at)))
            db.rollback()
        (gates / str(JOBS)).touch()

        assert client.runs.wait([client.runs.get(n) for n in names], timeout=120) == [RunStatus.DONE] * (JOBS + 1)
    log = agent.output()
    assert "self-fence" not in log, log[-3000:]
    done = [r for r in cluster.runs() if r["name"] in names]
    assert all(r["jobs"][0]["attempt"] == 1 for r in done), done
    assert cluster.coordinator is not None and "lost: its lease ran out" not in cluster.coordinator.output()
