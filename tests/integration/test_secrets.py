"""Secrets reach every job, are masked in its logs, and are not in the SQLite file."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Cluster, search, write_project

pytestmark = pytest.mark.integration

VALUE = "wandb-9f8e7d6c5b4a"


def test_secret_reaches_the_job_masked_in_logs_and_encrypted_at_rest(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    r = cluster.cli("secrets", "add", "WANDB_API_KEY", VALUE)
    assert r.returncode == 0, r.stderr
    # from stdin, as a script would
    r = subprocess.run(
        [sys.executable, "-m", "dstack.cli", "secrets", "add", "SHORT"],
        input="ab\n",
        capture_output=True,
        text=True,
        env=cluster.env(),
        timeout=60,
    )
    assert r.returncode == 0 and "not masked" in r.stderr
    listed = json.loads(cluster.cli("secrets", "list", "--json").stdout)
    assert [s["name"] for s in listed] == ["SHORT", "WANDB_API_KEY"]
    assert VALUE not in json.dumps(listed)

    root = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: use
            provider: bash
            commands:
              - echo "key=$WANDB_API_KEY"
              - echo -n "$WANDB_API_KEY" | base64
              - echo -n "$WANDB_API_KEY" | sha256sum | cut -c1-64
        """,
    )
    r = cluster.cli("run", "use", cwd=root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["key=***", "***", hashlib.sha256(VALUE.encode()).hexdigest()]
    name = search(r"(\S+) submitted", r.stderr).group(1)
    assert cluster.cli("logs", name).stdout.splitlines()[:2] == ["key=***", "***"]

    cluster.stop_all()  # flush the database (WAL) to disk, then look at every byte of it
    server = cluster.tmp / "server"
    for f in server.glob("coordinator.db*"):
        data = f.read_bytes()
        assert VALUE.encode() not in data and base64.b64encode(VALUE.encode()) not in data, f
    assert (server / "secrets.key").stat().st_mode & 0o777 == 0o600

    # the coordinator restarts with the same key and still hands the secret out
    cluster.agents.clear()
    cluster.start_coordinator()
    cluster.start_agent()
    r = cluster.cli("run", "use", cwd=root)
    assert r.returncode == 0 and hashlib.sha256(VALUE.encode()).hexdigest() in r.stdout
    assert cluster.cli("secrets", "delete", "WANDB_API_KEY").returncode == 0
    r = cluster.cli("secrets", "delete", "WANDB_API_KEY")
    assert r.returncode != 0 and "does not exist" in r.stderr
