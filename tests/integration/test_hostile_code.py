"""Hostile code archives, sent as an attacker would: a member of the team (or anyone holding a user
token) uploads a crafted tarball with PutCode and submits a run of it; a real agent must refuse it
with a message naming the member and write nothing outside the job's folder.

The archives are the ones tests/unit/test_unpack.py builds (the CVE-2025-4517 PATH_MAX symlink chain
and the classic `..`, absolute, link-out, hard-link and device members), aimed at a sentinel folder
the agent's user can write: a `..` chain deeper than any folder climbs to `/` and back down to it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from dstack.cli.client import Client
from dstack.cli.home import Endpoint
from dstack.protos.v1 import client_pb2, common_pb2
from tests.conftest import Cluster
from tests.unit.test_unpack import Member, _cve_2025_4517, _file, _special, _symlink

pytestmark = pytest.mark.integration

UP = "../" * 64  # more than any folder's depth: from the job folder up to `/`


def attacks(sentinel: Path) -> dict[str, tuple[list[Member], str]]:
    to_sentinel = UP + str(sentinel).lstrip("/")
    return {
        "dotdot": ([_file("ok.py"), _file(to_sentinel + "/pwned")], "escapes the job folder"),
        "absolute": ([_file(str(sentinel / "pwned"))], "is an absolute path"),
        "symlink-out-then-file": (
            [_symlink("out", str(sentinel)), _file("out/pwned")],
            "points outside the job folder",
        ),
        "relative-symlink-out": ([_symlink("out", to_sentinel), _file("out/pwned")], "points outside the job folder"),
        "hardlink-out": ([_special("hl", tarfile.LNKTYPE, str(sentinel / "secret"))], "is a hard link"),
        "chardev": ([_special("null", tarfile.CHRTYPE)], "is a character device"),
        "cve-2025-4517": (_cve_2025_4517(to_sentinel), "code archive: "),
    }


def archive(members: list[Member]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return gzip.compress(raw.getvalue(), mtime=0)


def test_hostile_archives_uploaded_by_a_user_write_nothing_outside_the_job(cluster: Cluster, tmp_path: Path) -> None:
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "secret").write_text("secret")
    cluster.start_coordinator()
    cluster.start_agent()
    client = Client(Endpoint(cluster.address, cluster.admin_token, ca_file=str(cluster.ca_file)), timeout=60.0)
    runs: dict[str, tuple[str, str]] = {}
    try:
        for name, (members, message) in attacks(sentinel).items():
            data = archive(members)
            digest = hashlib.sha256(data).hexdigest()
            client.put_code(digest, data)
            spec = common_pb2.JobSpec(job_name="main", workflow=name, provider="bash", commands=["ls -la"])
            run = client.submit(
                client_pb2.SubmitRunRequest(
                    workflow=name, jobs=[spec], code=common_pb2.CodeRef(hash=digest, size=len(data))
                )
            )
            runs[name] = (run.name, message)
    finally:
        client.close()
    for name, (run_name, message) in runs.items():
        info = cluster.wait_status(run_name, {"failed", "done"}, timeout=120)
        assert info["status"] == "failed", (name, info)
        logs = cluster.cli("logs", run_name)
        shown = logs.stdout + logs.stderr + str(info)
        assert message in shown, (name, shown)
    # Nothing landed beside the job folders: the sentinel holds what it held, and the agent lives on.
    assert sorted(p.name for p in sentinel.iterdir()) == ["secret"]
    assert (sentinel / "secret").read_text() == "secret"
    assert any(a["name"] == "agent-1" and a["status"] == "online" for a in cluster.agents_json())
