"""A team on one pool, with real processes: users and roles, who may change which run, revocation at
once, and personal secrets that reach only their owner's jobs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from dstack.protos.v1 import client_pb2, client_pb2_grpc
from tests.conftest import Cluster, search, write_project

pytestmark = pytest.mark.integration

WORKFLOWS = """
workflows:
  - name: long
    provider: bash
    commands:
      - for i in $(seq 1 600); do echo "tick $i"; sleep 0.2; done
  - name: quick
    provider: bash
    commands:
      - echo quick
  - name: show
    provider: bash
    commands:
      - echo "x=$(echo -n "$X" | sha256sum | cut -c1-64)"
      - echo "mine=${#MINE}"
"""


def cli_as(
    cluster: Cluster, token: str, *args: str, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The CLI with another user's token (and a home of its own)."""
    env = {**cluster.env(), "DSTACK_TOKEN": token, "DSTACK_HOME": str(cluster.tmp / f"home-{hash(token) & 0xFFFF}")}
    return subprocess.run(
        [sys.executable, "-m", "dstack.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or cluster.tmp,
        input=stdin,
        timeout=120,
    )


def add_user(cluster: Cluster, name: str, role: str = "member") -> str:
    r = cluster.cli("users", "add", name, "--role", role)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"user {name} ({role}) added; their token is shown this once:", r.stdout
    return lines[1]


def refused(r: subprocess.CompletedProcess[str], message: str) -> None:
    assert r.returncode != 0, r.stdout
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


def submitted(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stderr
    return search(r"(\S+) submitted", r.stderr).group(1)


def test_members_change_only_their_own_runs_viewers_only_read(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    root = write_project(tmp_path / "p", WORKFLOWS)
    alice, bob, vera = add_user(cluster, "alice"), add_user(cluster, "bob"), add_user(cluster, "vera", "viewer")

    r = cli_as(cluster, alice, "whoami")
    assert r.returncode == 0 and r.stdout.splitlines() == [
        "user: alice",
        "role: member",
        f"coordinator: {cluster.address}",
    ]
    listed = json.loads(cluster.cli("users", "list", "--json").stdout)
    assert [(u["name"], u["role"]) for u in listed] == [
        ("admin", "admin"),
        ("alice", "member"),
        ("bob", "member"),
        ("vera", "viewer"),
    ]
    everything = (
        json.dumps(listed) + cluster.cli("users", "list").stdout + cli_as(cluster, vera, "users", "list").stdout
    )
    for token in (alice, bob, vera, cluster.admin_token):
        assert token not in everything

    run = submitted(cli_as(cluster, alice, "run", "long", "-d", cwd=root))
    cluster.wait_status(run, {"running"})

    # Another member: refused, told who may; the run goes on.
    refused(cli_as(cluster, bob, "stop", run), f"only the owner (alice) or an admin can stop run {run}")
    with cluster.channel() as ch:
        with pytest.raises(grpc.RpcError) as e:
            client_pb2_grpc.ClientServiceStub(ch).StopRun(
                client_pb2.StopRunRequest(name=run), metadata=[("authorization", f"Bearer {bob}")]
            )
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert cluster.run_info(run)["status"] == "running"

    # A viewer reads everything and submits nothing.
    refused(
        cli_as(cluster, vera, "run", "quick", "-d", cwd=root), "needs the member role; you are a viewer (user vera)"
    )
    for args in (
        ("ps", "-a"),
        ("logs", run),
        ("artifacts", "list", run),
        ("tags", "list"),
        ("agents",),
        ("secrets", "list"),
    ):
        r = cli_as(cluster, vera, *args)
        assert r.returncode == 0, (args, r.stderr)

    # A member manages no users, team secrets, join tokens or agents.
    for args in (
        ("users", "add", "eve"),
        ("users", "remove", "vera"),
        ("users", "rotate-token", "vera"),
        ("join-tokens", "create"),
        ("agents", "remove", "agent-1"),
    ):
        refused(cli_as(cluster, bob, *args), "needs the admin role; you are a member (user bob)")
    refused(
        cli_as(cluster, bob, "secrets", "add", "TEAM_KEY", "value-1234"), "adding a team secret needs the admin role"
    )

    # The owner stops it; its removal, like its tags, is the owner's or an admin's.
    assert cli_as(cluster, alice, "stop", run).returncode == 0
    cluster.wait_status(run, {"stopped"})
    refused(cli_as(cluster, bob, "rm", run), f"only the owner (alice) or an admin can remove run {run}")
    done = submitted(cli_as(cluster, alice, "run", "quick", cwd=root))
    refused(cli_as(cluster, bob, "tags", "add", "best", done), f"only the owner (alice) or an admin can tag run {done}")
    assert cli_as(cluster, alice, "tags", "add", "best", done).returncode == 0
    # Tags live in the run's repository (alice's local folder: local/alice/p): named in full from elsewhere.
    best = f"{cluster.run_info(done)['repository']}/best"
    refused(cli_as(cluster, bob, "tags", "delete", best), "only the owner (alice) or an admin can delete tag best")
    assert cluster.cli("tags", "delete", best).returncode == 0
    assert cluster.cli("rm", run).returncode == 0  # an admin may

    # The database holds no token in the clear.
    cluster.stop_all()
    for f in (cluster.tmp / "server").glob("coordinator.db*"):
        data = f.read_bytes()
        for token in (alice, bob, vera, cluster.admin_token):
            assert token.encode() not in data, f


def test_a_removed_or_rotated_token_is_refused_at_once(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    root = write_project(tmp_path / "p", WORKFLOWS)
    bob = add_user(cluster, "bob")
    for _ in range(2):
        assert cli_as(cluster, bob, "ps").returncode == 0

    r = cluster.cli("users", "rotate-token", "bob")
    assert r.returncode == 0, r.stderr
    new = r.stdout.splitlines()[1]
    assert new != bob
    refused(cli_as(cluster, bob, "ps"), "invalid token")  # the very next call, no waiting
    assert cli_as(cluster, new, "ps").returncode == 0

    # A followed log stream ends on its next message once its user is removed.
    run = submitted(cli_as(cluster, new, "run", "long", "-d", cwd=root))
    follower = subprocess.Popen(
        [sys.executable, "-m", "dstack.cli", "logs", "-f", run],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**cluster.env(), "DSTACK_TOKEN": new},
    )
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline().startswith("tick")
        assert cluster.cli("users", "remove", "bob").returncode == 0
        refused(cli_as(cluster, new, "ps"), "invalid token")
        _, err = follower.communicate(timeout=60)
        assert follower.returncode != 0 and "revoked" in err and "Traceback" not in err, err
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    # The run stays bob's; an admin stops it.
    assert cluster.run_info(run)["owner"] == "bob"
    assert cluster.cli("stop", run).returncode == 0


def test_personal_secrets_reach_only_their_owners_jobs(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    root = write_project(tmp_path / "p", WORKFLOWS)
    alice, bob = add_user(cluster, "alice"), add_user(cluster, "bob")
    assert cluster.cli("secrets", "add", "X", "team-value-1234").returncode == 0
    # From stdin: the value stays out of shell history.
    r = cli_as(cluster, alice, "secrets", "add", "X", "--personal", stdin="alice-value-5678\n")
    assert r.returncode == 0 and "personal secret X saved" in r.stdout, r.stderr
    assert cli_as(cluster, alice, "secrets", "add", "MINE", "--personal", stdin="alice-only-9\n").returncode == 0

    def shown(token: str) -> list[str]:
        r = cli_as(cluster, token, "run", "show", cwd=root)
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines()

    def sha(v: str) -> str:
        return hashlib.sha256(v.encode()).hexdigest()

    # The same workflow, two owners: each job got the team's secrets and its owner's own, nothing else.
    assert shown(alice) == [f"x={sha('alice-value-5678')}", "mine=12"]
    assert shown(bob) == [f"x={sha('team-value-1234')}", "mine=0"]
    assert shown(cluster.admin_token) == [f"x={sha('team-value-1234')}", "mine=0"]

    def names(token: str) -> list[tuple[str, str]]:
        r = cli_as(cluster, token, "secrets", "list", "--json")
        assert r.returncode == 0, r.stderr
        return [(s["name"], s["scope"]) for s in json.loads(r.stdout)]

    assert names(alice) == [("MINE", "personal"), ("X", "team"), ("X", "personal")]
    assert names(bob) == [("X", "team")]
    refused(cli_as(cluster, bob, "secrets", "delete", "X"), "deleting a team secret needs the admin role")
    assert cli_as(cluster, alice, "secrets", "delete", "X", "--personal").returncode == 0
    assert shown(alice) == [f"x={sha('team-value-1234')}", "mine=12"]

    # A token saved from stdin, as `dstack config --token -` reads it.
    home = cluster.tmp / "alice-home"
    r = subprocess.run(
        [sys.executable, "-m", "dstack.cli", "config", "--coordinator", cluster.address, "--token", "-"],
        input=alice + "\n",
        capture_output=True,
        text=True,
        env={k: v for k, v in cluster.env().items() if k not in ("DSTACK_TOKEN", "DSTACK_COORDINATOR")}
        | {"DSTACK_HOME": str(home)},
        timeout=60,
    )
    assert r.returncode == 0 and "as alice" in r.stdout, r.stderr
