"""Enrolment, attacked with real processes: join tokens with a use limit, an expiry and a revocation
(the server's own `default` one too, across a restart); removed agents; `--approve-agents`; every
registered agent listed; admin-only commands; no token in the database file."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, client_pb2, client_pb2_grpc, common_pb2
from tests.conftest import PY, REPO, Cluster, Proc, wait_for, write_project

pytestmark = pytest.mark.integration

REMOVED = "this agent was removed by an admin"
SLEEPER = """
workflows:
  - name: sleeper
    provider: bash
    commands: ['echo "pid=$$"', "exec sleep 600"]
  - name: gpu
    provider: bash
    commands: ['echo "gpus=$CUDA_VISIBLE_DEVICES"']
    resources: {gpu: 1}
"""


def spawn_agent(cluster: Cluster, name: str, token: str, *extra: str) -> Proc:
    """An agent with a home of its own (tmp/NAME), enrolling with `token` from the environment."""
    home = cluster.tmp / name
    log = cluster.tmp / f"{name}.log"
    with log.open("ab") as f:
        popen = subprocess.Popen(
            [
                *(PY, "-m", "dstack.agent", "--coordinator", cluster.address),
                *("--home", str(home), "--name", name, "--runtime", "host", "--stop-grace", "2", *extra),
                *cluster.transport_args(),
                *("--job-user", "none"),  # jobs as the agent's user, as in tests/conftest.py
            ],
            stdout=f,
            stderr=f,
            env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {"DSTACK_JOIN_TOKEN": token},
            cwd=REPO,
        )
    proc = Proc(popen, log)
    cluster.agents.append(proc)
    return proc


def statuses_of(cluster: Cluster, name: str) -> list[str]:
    """The statuses of the listed agents of that name (a removed one and its successor share it)."""
    return [str(a["status"]) for a in cluster.agents_json() if a["name"] == name]


def status_of(cluster: Cluster, name: str) -> str | None:
    found = statuses_of(cluster, name)
    assert len(found) <= 1, found
    return found[0] if found else None


def wait_agent(cluster: Cluster, name: str, status: str) -> None:
    wait_for(lambda: status in statuses_of(cluster, name), what=f"agent {name} {status}")


def create_token(cluster: Cluster, *args: str) -> dict[str, object]:
    r = cluster.cli("join-tokens", "create", "--json", *args)
    assert r.returncode == 0, r.stderr
    created: dict[str, object] = json.loads(r.stdout)
    return created


def tokens(cluster: Cluster) -> dict[str, dict[str, object]]:
    r = cluster.cli("join-tokens", "list", "--json")
    assert r.returncode == 0, r.stderr
    return {str(t["id"]): t for t in json.loads(r.stdout)}


def register(cluster: Cluster, token: str, name: str) -> agent_pb2.RegisterResponse:
    """A raw Register, as a hand-written agent sends it."""
    with cluster.channel() as ch:
        resp: agent_pb2.RegisterResponse = agent_pb2_grpc.AgentServiceStub(ch).Register(
            agent_pb2.RegisterRequest(name=name, inventory=common_pb2.Inventory(hostname="raw")),
            metadata=[("authorization", f"Bearer {token}")],
            timeout=30,
        )
    return resp


def refused_register(cluster: Cluster, token: str, name: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        register(cluster, token, name)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value
    return e.value


def test_a_one_use_token_enrols_one_agent_and_refuses_the_next(cluster: Cluster) -> None:
    cluster.start_coordinator()
    created = create_token(cluster, "--uses", "1")
    token, token_id = str(created["token"]), str(created["id"])
    assert created["max_uses"] == 1 and created["uses"] == 0
    spawn_agent(cluster, "first", token)
    wait_agent(cluster, "first", "online")
    second = spawn_agent(cluster, "second", token)
    wait_for(lambda: second.popen.poll() is not None, what="the second agent to exit")
    assert second.popen.returncode != 0
    assert f"join token {token_id} is used up (1 of 1 uses)" in second.output()
    assert "Traceback" not in second.output()
    assert status_of(cluster, "second") is None
    listed = tokens(cluster)[token_id]
    assert listed["uses"] == 1 and "token" not in listed
    # The first keeps its own credential: a coordinator restart does not need the join token again.
    cluster.coordinator.terminate()  # type: ignore[union-attr]
    cluster.start_coordinator()
    wait_agent(cluster, "first", "online")


def race_for(cluster: Cluster, token: str, names: list[str]) -> list[str]:
    """Registers every name with `token` at once (one thread each); what each was answered."""
    start = threading.Barrier(len(names))
    outcomes: list[str] = []

    def race(name: str) -> None:
        start.wait()
        try:
            register(cluster, token, name)
            outcomes.append("enrolled")
        except grpc.RpcError as e:
            outcomes.append(f"{e.code().name}: {e.details()}")

    threads = [threading.Thread(target=race, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_two_agents_racing_for_the_last_use_one_wins(cluster: Cluster) -> None:
    cluster.start_coordinator()
    for round_ in range(3):
        token = str(create_token(cluster, "--uses", "1")["token"])
        outcomes = race_for(cluster, token, [f"racer-{round_}-{i}" for i in range(8)])
        assert outcomes.count("enrolled") == 1, outcomes
        assert all(o == "enrolled" or ("UNAUTHENTICATED" in o and "is used up" in o) for o in outcomes), outcomes


def test_expired_revoked_and_unknown_tokens_are_refused_saying_which(cluster: Cluster) -> None:
    cluster.start_coordinator()
    short = create_token(cluster, "--ttl", "1s")
    wait_for(lambda: tokens(cluster)[str(short["id"])]["expired"], what="the token to expire")
    e = refused_register(cluster, str(short["token"]), "late")
    assert f"join token {short['id']} expired" in (e.details() or "")

    revoked = create_token(cluster)
    r = cluster.cli("join-tokens", "revoke", str(revoked["id"]))
    assert r.returncode == 0, r.stderr
    e = refused_register(cluster, str(revoked["token"]), "revoked")
    assert f"join token {revoked['id']} was revoked" in (e.details() or "")

    e = refused_register(cluster, "not-a-token", "guess")
    assert "invalid join token" in (e.details() or "")
    assert not {"late", "revoked", "guess"} & {a["name"] for a in cluster.agents_json()}
    listing = cluster.cli("join-tokens", "list")
    assert listing.returncode == 0 and "revoked" in listing.stdout and "expired" in listing.stdout


def test_a_revoked_default_token_stays_revoked_after_a_restart(cluster: Cluster) -> None:
    cluster.start_coordinator()
    cluster.start_agent("before")  # enrolled with the default token: it keeps its own credential
    assert tokens(cluster)["default"]["revoked"] is False
    r = cluster.cli("join-tokens", "revoke", "default")
    assert r.returncode == 0, r.stderr
    e = refused_register(cluster, cluster.join_token, "after")
    assert "join token default was revoked" in (e.details() or "")
    cluster.coordinator.terminate()  # type: ignore[union-attr]
    cluster.start_coordinator()  # DSTACK_JOIN_TOKEN still holds the same value
    assert tokens(cluster)["default"]["revoked"] is True
    e = refused_register(cluster, cluster.join_token, "after")
    assert "join token default was revoked" in (e.details() or "")
    wait_agent(cluster, "before", "online")


def test_a_removed_agent_stops_its_job_fails_and_its_credential_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    agent = spawn_agent(cluster, "gpu-1", cluster.join_token)
    wait_agent(cluster, "gpu-1", "online")
    creds = json.loads((cluster.tmp / "gpu-1" / "agent.json").read_text())
    project = write_project(tmp_path / "p", SLEEPER)
    run = cluster.cli("run", "-d", "sleeper", cwd=project).stdout.strip()
    cluster.wait_status(run, {"running"})
    pid = int(wait_for(lambda: re.search(r"pid=(\d+)", cluster.cli("logs", run).stdout), what="the job's pid")[1])

    r = cluster.cli("agents", "remove", "gpu-1")
    assert r.returncode == 0, r.stderr
    assert "1 running job(s) failed" in r.stdout
    failed = cluster.wait_status(run, {"failed"})
    assert "agent gpu-1 was removed by an admin" in (failed["message"] or "")
    wait_for(lambda: agent.popen.poll() is not None, what="the removed agent to exit")
    assert agent.popen.returncode != 0
    assert REMOVED in agent.output() and "Traceback" not in agent.output()
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), what="the removed agent's job process to end")
    assert status_of(cluster, "gpu-1") == "removed"

    # Its old credential, replayed by hand: refused before any message, for every agent call.
    auth = [("authorization", f"Bearer {creds['agent_token']}")]
    with cluster.channel() as ch:
        stub = agent_pb2_grpc.AgentServiceStub(ch)
        hello = agent_pb2.AgentMessage(hello=agent_pb2.Hello(agent_id=creds["agent_id"], inventory=inventory(8)))
        stream = stub.Connect(iter([hello]), metadata=auth, timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            received = list(stream)
            pytest.fail(f"a removed agent received {received}")
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and REMOVED in (e.value.details() or "")
        with pytest.raises(grpc.RpcError) as e:
            b"".join(c.data for c in stub.GetCode(agent_pb2.GetCodeRequest(hash="x"), metadata=auth, timeout=10))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and REMOVED in (e.value.details() or "")

    # No job goes to it, and its name is free for a new agent (with a new credential).
    later = cluster.cli("run", "-d", "sleeper", cwd=project).stdout.strip()
    wait_for(lambda: cluster.run_info(later)["message"], what="a pending reason for the next run")
    assert cluster.run_info(later)["status"] in ("submitted", "pending")
    spawn_agent(cluster, "gpu-1", cluster.join_token, "--home", str(tmp_path / "new-home"))
    wait_agent(cluster, "gpu-1", "online")
    assert sorted(statuses_of(cluster, "gpu-1")) == ["online", "removed"]  # the removed one stays listed
    cluster.wait_status(later, {"running"})
    r = cluster.cli("agents", "remove", "nobody")
    assert r.returncode != 0 and "no agent named nobody" in r.stderr


def inventory(gpus: int) -> common_pb2.Inventory:
    return common_pb2.Inventory(
        hostname="fake",
        cpu_count=64,
        memory_total_bytes=1 << 40,
        memory_available_bytes=1 << 40,
        runtime="host",
        gpus=[
            common_pb2.GpuInfo(index=i, name="NVIDIA H100 80GB HBM3", memory_total_bytes=80 << 30, simulated=True)
            for i in range(gpus)
        ],
    )


def test_a_fake_eight_gpu_agent_gets_no_job_until_approved(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator("--approve-agents")
    spawn_agent(cluster, "fake", cluster.join_token, "--simulate-gpus", "8xH100-80GB")
    wait_agent(cluster, "fake", "pending approval")
    shown = next(a for a in cluster.agents_json() if a["name"] == "fake")
    assert len(shown["gpus"]) == 8  # the admin sees what it claims before approving it
    project = write_project(tmp_path / "p", SLEEPER)
    run = cluster.cli("run", "-d", "gpu", cwd=project).stdout.strip()
    # A scheduling pass has seen the run and left it waiting: the pending agent is not a candidate.
    waiting = wait_for(lambda: (r := cluster.run_info(run))["message"] and r, what="a pending reason")
    assert waiting["status"] in ("submitted", "pending"), waiting
    r = cluster.cli("agents", "approve", "fake")
    assert r.returncode == 0, r.stderr
    wait_agent(cluster, "fake", "online")
    assert cluster.wait_status(run, {"done"})["status"] == "done"
    r = cluster.cli("agents", "approve", "fake")
    assert r.returncode != 0 and "not waiting for approval" in r.stderr


def test_an_agent_that_registered_and_never_connected_is_listed(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # each cell on one line, to find it in the table
    cluster.start_coordinator()
    register(cluster, cluster.join_token, "ghost")
    assert status_of(cluster, "ghost") == "never connected"
    table = cluster.cli("agents")
    assert table.returncode == 0 and "ghost" in table.stdout and "never connected" in table.stdout


def add_member(cluster: Cluster, name: str, token: str) -> None:
    """A second user row with a role other than admin (`dstack users` comes later)."""
    conn = sqlite3.connect(cluster.tmp / "server" / "coordinator.db", timeout=10)
    with conn:
        conn.execute(
            "INSERT INTO users (name, token_hash, role, created_at) VALUES (?, ?, 'member', ?)",
            [name, hashlib.sha256(token.encode()).hexdigest(), time.time_ns()],
        )
    conn.close()


def test_a_member_cannot_manage_enrolment(cluster: Cluster) -> None:
    cluster.start_coordinator()
    cluster.start_agent("gpu-1")
    add_member(cluster, "alice", "alice-token")
    member = {**cluster.env(), "DSTACK_TOKEN": "alice-token"}

    def as_member(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PY, "-m", "dstack.cli", *args], capture_output=True, text=True, env=member, cwd=cluster.tmp, timeout=60
        )

    assert as_member("ps").returncode == 0  # a user all the same
    assert as_member("agents").returncode == 0
    for args in (
        ("join-tokens", "create", "--uses", "100"),
        ("join-tokens", "list"),
        ("join-tokens", "revoke", "default"),
        ("agents", "remove", "gpu-1"),
        ("agents", "approve", "gpu-1"),
    ):
        r = as_member(*args)
        assert r.returncode != 0, args
        assert "needs the admin role; you are a member" in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    # On the wire: PERMISSION_DENIED; and an agent's token is no admin's either.
    with cluster.channel() as ch:
        stub = client_pb2_grpc.ClientServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            member_auth = [("authorization", "Bearer alice-token")]
            stub.CreateJoinToken(client_pb2.CreateJoinTokenRequest(), metadata=member_auth)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        agent_token = json.loads((cluster.tmp / "gpu-1" / "agent.json").read_text())["agent_token"]
        with pytest.raises(grpc.RpcError) as e:
            stub.CreateJoinToken(
                client_pb2.CreateJoinTokenRequest(), metadata=[("authorization", f"Bearer {agent_token}")]
            )
        assert e.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    assert status_of(cluster, "gpu-1") == "online"
    assert tokens(cluster)["default"]["revoked"] is False


def test_no_join_or_agent_token_is_in_the_database_file(cluster: Cluster) -> None:
    cluster.start_coordinator()
    created = create_token(cluster, "--uses", "2")
    spawn_agent(cluster, "a", str(created["token"]))
    cluster.start_agent("b")  # the default token
    wait_agent(cluster, "a", "online")
    secrets = {
        "default join token": cluster.join_token,
        "created join token": str(created["token"]),
        "admin token": cluster.admin_token,
        **{f"agent {n}'s token": json.loads((cluster.tmp / n / "agent.json").read_text())["agent_token"] for n in "ab"},
    }
    server = cluster.tmp / "server"
    files = [server / n for n in ("coordinator.db", "coordinator.db-wal") if (server / n).exists()]
    data = b"".join(f.read_bytes() for f in files)
    assert data, files
    found = [what for what, value in secrets.items() if value.encode() in data]
    assert found == []
    # The hashes are there: that is what the coordinator checks against.
    assert hashlib.sha256(str(created["token"]).encode()).hexdigest().encode() in data
