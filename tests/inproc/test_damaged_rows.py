"""A damaged row shows as damaged; it does not break the views of everything else.

A stored blob (a job's spec, a run's code reference, an agent's inventory) that no longer parses, written
behind the coordinator's back as a damaged database would hold it: GetRun, ListRuns, ListAgents, the HTTP
API and the real CLI's `ps`, `agents` and `show` still answer; the other runs, jobs and agents show as
before; the damaged one shows with its status and a marker saying what could not be read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import urllib.request
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from dstack.coordinator import stored
from dstack.protos.v1 import client_pb2, common_pb2
from tests.inproc.factories import ADMIN, Harness, coordinator, job_spec, sim_agent, submit_run

pytestmark = pytest.mark.inproc

GARBAGE = b"\xff\xff\xff\xff"
WAITING_RUN = (common_pb2.RUN_STATUS_SUBMITTED, common_pb2.RUN_STATUS_PENDING)
WAITING_JOB = (common_pb2.JOB_STATUS_SUBMITTED, common_pb2.JOB_STATUS_PENDING)


def damage(h: Harness, sql: str, key: str) -> None:
    """Garbage in one row's blob, written through a second connection (a damaged database)."""
    with contextlib.closing(sqlite3.connect(h.config.db_path)) as c, c:
        assert c.execute(sql, [GARBAGE, key]).rowcount == 1


def damage_root_page(db: Path, table: str) -> None:
    """Bytes of garbage over the table's root page, in the file itself (a bad sector)."""
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (page_size,) = c.execute("PRAGMA page_size").fetchone()
        (root,) = c.execute("SELECT rootpage FROM sqlite_master WHERE type = 'table' AND name = ?", [table]).fetchone()
    with open(db, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xa5" * page_size)


async def cli(h: Harness, *args: str) -> tuple[int, str, str]:
    """The real CLI, in its own process, against this coordinator."""
    env = {**os.environ, "DSTACK_COORDINATOR": h.address, "DSTACK_TOKEN": ADMIN, "DSTACK_INSECURE": "1"}
    env["COLUMNS"] = "300"
    p = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dstack.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await p.communicate()
    assert p.returncode is not None
    return p.returncode, out.decode(), err.decode()


def http_get(h: Harness, path: str) -> object:
    url = h.config.http_url_path.read_text().strip() + path
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


async def get_json(h: Harness, path: str) -> object:
    return await asyncio.to_thread(http_get, h, path)


async def test_a_job_whose_stored_spec_is_damaged_shows_as_damaged_and_the_others_as_before(tmp_path: Path) -> None:
    async with coordinator(tmp_path, http_port=0) as h:
        runs = [await submit_run(h, job_spec("main"), job_spec("other")) for _ in range(2)]
        bad = runs[0].jobs[0]
        damage(h, "UPDATE jobs SET spec = ? WHERE id = ?", bad.id)
        # GetRun: the damaged job with its status and the marker, its sibling whole.
        run = await h.run(runs[0].name)
        jobs = {j.job_name: j for j in run.jobs}
        assert stored.SPEC_DAMAGED in jobs["main"].message
        assert jobs["main"].status in WAITING_JOB and jobs["main"].id == bad.id
        assert jobs["other"].spec == runs[0].jobs[1].spec and stored.DAMAGED not in jobs["other"].message
        # ListRuns: both runs.
        listed = await h.client.ListRuns(client_pb2.ListRunsRequest(all=True), metadata=h.meta)
        assert sorted(r.name for r in listed.runs) == sorted(r.name for r in runs)
        # The HTTP API: the run, and the list.
        one = await get_json(h, f"/api/runs/{runs[0].name}")
        assert isinstance(one, dict)
        main = next(j for j in one["jobs"] if j["job_name"] == "main")
        assert stored.SPEC_DAMAGED in main["message"] and main["resources"] is None
        page = await get_json(h, "/api/runs")
        assert isinstance(page, dict) and sorted(r["name"] for r in page["runs"]) == sorted(r.name for r in runs)
        # The CLI: no traceback, both runs listed, the damaged job says so.
        rc, out, err = await cli(h, "ps", "-a")
        assert rc == 0 and "Traceback" not in err, err
        assert all(r.name in out for r in runs), out
        rc, out, err = await cli(h, "ps", "-a", "--json")
        assert rc == 0 and "Traceback" not in err, err
        rc, out, err = await cli(h, "show", runs[0].name)
        assert "Traceback" not in err + out, err
        assert "damaged" in out + err, out + err


async def test_a_run_whose_stored_code_reference_is_damaged_shows_as_damaged(tmp_path: Path) -> None:
    async with coordinator(tmp_path, http_port=0) as h:
        runs = [await submit_run(h, job_spec()) for _ in range(2)]
        damage(h, "UPDATE runs SET code = ? WHERE name = ?", runs[0].name)
        run = await h.run(runs[0].name)
        assert stored.CODE_DAMAGED in run.message and run.status in WAITING_RUN
        assert run.jobs[0].spec == runs[0].jobs[0].spec
        listed = await h.client.ListRuns(client_pb2.ListRunsRequest(all=True), metadata=h.meta)
        assert sorted(r.name for r in listed.runs) == sorted(r.name for r in runs)
        page = await get_json(h, "/api/runs")
        assert isinstance(page, dict) and len(page["runs"]) == 2
        rc, out, err = await cli(h, "ps", "-a")
        assert rc == 0 and "Traceback" not in err and all(r.name in out for r in runs), err + out


async def test_an_agent_whose_stored_inventory_is_damaged_shows_as_damaged(tmp_path: Path) -> None:
    async with coordinator(tmp_path, http_port=0) as h, sim_agent(h, "good"), sim_agent(h, "bad") as bad:
        damage(h, "UPDATE agents SET inventory = ? WHERE id = ?", bad.agent_id)
        listed = await h.client.ListAgents(client_pb2.ListAgentsRequest(), metadata=h.meta)
        by_name = {a.name: a for a in listed.agents}
        assert set(by_name) == {"good", "bad"} and by_name["good"].inventory.hostname == "good"
        assert by_name["bad"].inventory.hostname == stored.INVENTORY_DAMAGED
        page = await get_json(h, "/api/agents")
        assert isinstance(page, dict) and {a["name"] for a in page["agents"]} == {"good", "bad"}
        rc, out, err = await cli(h, "agents")
        assert rc == 0 and "Traceback" not in err and "good" in out and "bad" in out, err + out


async def test_a_damaged_chunk_of_log_lines_shows_as_lost_and_the_lines_after_it_still_come(tmp_path: Path) -> None:
    async with coordinator(tmp_path, http_port=0) as h, sim_agent(h, "a") as agent:
        run = await submit_run(h, job_spec())
        (a,) = await agent.wait_assignments(1)
        await agent.report(a.job_id, common_pb2.JOB_STATUS_RUNNING)
        await agent.log(a.job_id, 1, "one", "two")
        await agent.log(a.job_id, 3, "three")
        damage(h, "UPDATE log_chunks SET body = ? WHERE job_id = ? AND first_seq = 1", a.job_id)
        lost = "[lines 1-2 could not be read: the database is damaged]"
        assert await h.logs(run.name) == [("main", 2, lost), ("main", 3, "three")]
        got = await get_json(h, f"/api/runs/{run.name}/logs")
        assert isinstance(got, dict) and [ln["text"] for ln in got["lines"]] == [lost, "three"]
        rc, out, err = await cli(h, "logs", run.name)
        assert rc == 0 and "Traceback" not in err and out.splitlines() == [lost, "three"], err + out


async def test_a_damaged_part_of_a_run_s_record_is_left_out_and_the_record_still_shows(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as h:
        run = await submit_run(h, job_spec())
        with contextlib.closing(sqlite3.connect(h.config.db_path)) as c, c:
            assert c.execute("UPDATE records SET body = '{not json' WHERE part = 'submission'").rowcount == 1
        rc, out, err = await cli(h, "show", run.name, "--json")
        assert rc == 0 and "Traceback" not in err, err
        record = json.loads(out)
        assert record["run"]["name"] == run.name and record["resolved_workflow"] is None


async def test_a_damaged_row_is_logged_once_not_at_every_call(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with coordinator(tmp_path) as h:
        run = await submit_run(h, job_spec())
        damage(h, "UPDATE jobs SET spec = ? WHERE id = ?", run.jobs[0].id)
        for _ in range(3):
            assert stored.SPEC_DAMAGED in (await h.run(run.name)).jobs[0].message
        warned = [r for r in caplog.records if r.name == stored.log.name and run.jobs[0].id in r.getMessage()]
        assert len(warned) == 1, warned


async def test_a_coordinator_whose_jobs_table_has_a_damaged_page_exits_with_a_clear_message(tmp_path: Path) -> None:
    """A damaged page that opening and migrating the database do not read, but the start's load of the
    waiting jobs does: the same clear exit as a damaged header (tests/integration/test_state_errors.py),
    not a traceback."""
    async with coordinator(tmp_path) as h:
        for _ in range(200):  # the jobs table spans pages: its root is an interior page
            await submit_run(h, job_spec())
    db = h.config.db_path
    damage_root_page(db, "jobs")
    err = await serve_fails(db.parent)
    assert err.startswith(f"dstack server: the database {db} is damaged") and "restore it from a backup" in err


async def serve_fails(state: Path) -> str:
    """`dstack server` on `state`, which must exit non-zero with no traceback; its last line of stderr."""
    env = {**os.environ, "DSTACK_ADMIN_TOKEN": ADMIN, "DSTACK_JOIN_TOKEN": "j"}
    cmd = ["-m", "dstack.coordinator", "--state-dir", str(state), "--listen", "127.0.0.1:0", "--insecure"]
    p = await asyncio.create_subprocess_exec(sys.executable, *cmd, env=env, stderr=asyncio.subprocess.PIPE)
    _, err_bytes = await asyncio.wait_for(p.communicate(), 60)
    err = err_bytes.decode()
    assert p.returncode != 0 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("what", ["a damaged ciphertext", "another key file"])
async def test_a_secret_the_key_cannot_decrypt_stops_the_start_with_a_clear_message(tmp_path: Path, what: str) -> None:
    async with coordinator(tmp_path) as h:
        await h.client.AddSecret(client_pb2.AddSecretRequest(name="token", value="v"), metadata=h.meta)
    if what == "a damaged ciphertext":
        with contextlib.closing(sqlite3.connect(h.config.db_path)) as c, c:
            assert c.execute("UPDATE secrets SET ciphertext = ? WHERE name = 'token'", [GARBAGE]).rowcount == 1
    else:
        h.config.secrets_key_path.write_bytes(Fernet.generate_key() + b"\n")
    err = await serve_fails(h.config.state_dir)
    assert err.startswith("dstack server: the team secret 'token' in the database"), err
    assert str(h.config.secrets_key_path) in err and "put back the key file" in err, err
