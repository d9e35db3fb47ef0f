"""Credentials stay where they are: out of run records, logs and the database, and unreadable by other users."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from dstack.cli.client import Client
from dstack.cli.home import Endpoint
from dstack.protos.v1 import client_pb2, common_pb2
from tests.conftest import PY, REPO, Cluster, LocalMode, Proc, search, wait_for, write_project

pytestmark = pytest.mark.integration

TOKEN = "ghp_LeakCanary0123456789abcdefABCDEF0123"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_token_in_the_git_remote_reaches_no_record(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: show
            provider: bash
            commands: ['echo "url=$REPO_URL"', "env"]
        """,
    )

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(project), *args], check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    git("-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init")
    git("remote", "add", "origin", f"https://x-access-token:{TOKEN}@github.com/org/repo.git")
    r = cluster.cli("run", "show", cwd=project)
    assert r.returncode == 0, r.stderr
    name = search(r"(\S+) submitted", r.stderr).group(1)
    # The job saw the URL without the token, in its REPO_URL and its whole environment.
    assert "url=https://github.com/org/repo.git" in r.stdout.splitlines()
    assert TOKEN not in r.stdout + r.stderr
    logs = cluster.cli("logs", name)
    assert "url=https://github.com/org/repo.git" in logs.stdout.splitlines()
    assert TOKEN not in logs.stdout
    ps = cluster.cli("ps", "-a", "--json")
    assert ps.returncode == 0, ps.stderr
    assert TOKEN not in ps.stdout
    [run] = [x for x in json.loads(ps.stdout) if x["name"] == name]
    assert run["code"]["repo_url"] == "https://github.com/org/repo.git"
    # Nor in the database's bytes, the write-ahead log included (read while the coordinator runs), nor in
    # what the coordinator and the agent log.
    assert_nowhere(tmp_path)


def assert_nowhere(tmp_path: Path) -> None:
    files = [*(tmp_path / "server").glob("coordinator.db*"), *tmp_path.glob("*.log")]
    assert any(f.name == "coordinator.db-wal" for f in files)
    for path in files:
        assert TOKEN.encode() not in path.read_bytes(), path.name


def test_the_coordinator_stores_no_token_an_old_client_sends(cluster: Cluster, tmp_path: Path) -> None:
    """A client older than the CLI's stripping (or a hostile one) sends the URL as git has it."""
    cluster.start_coordinator()
    cluster.start_agent()
    client = Client(Endpoint(cluster.address, cluster.admin_token, ca_file=str(cluster.ca_file)), timeout=30.0)
    try:
        spec = common_pb2.JobSpec(job_name="main", workflow="w", provider="bash", commands=['echo "url=$REPO_URL"'])
        url = f"https://oauth2:{TOKEN}@gitlab.example.com:8443/g/r.git"
        code = common_pb2.CodeRef(repo_url=url, branch="main", commit="c" * 40)
        run = client.submit(client_pb2.SubmitRunRequest(workflow="w", jobs=[spec], code=code))
    finally:
        client.close()
    assert run.code.repo_url == "https://gitlab.example.com:8443/g/r.git"
    cluster.wait_status(run.name, {"done"})
    logs = cluster.cli("logs", run.name)
    assert "url=https://gitlab.example.com:8443/g/r.git" in logs.stdout.splitlines(), logs.stdout + logs.stderr
    assert TOKEN not in cluster.cli("ps", "-a", "--json").stdout
    assert_nowhere(tmp_path)


def test_state_and_agent_home_are_the_owners_only(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("a1")
    server = tmp_path / "server"
    assert mode(server) == 0o700
    wait_for(lambda: (server / "coordinator.db-wal").exists(), what="the write-ahead log")
    for name in ("coordinator.db", "coordinator.db-wal", "coordinator.db-shm", "coordinator.lock"):
        assert mode(server / name) == 0o600, name
    home = tmp_path / "a1"
    assert mode(home) == 0o700
    assert mode(home / "agent.json") == 0o600


def test_a_start_tightens_what_an_older_version_left_open(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("a1")
    cluster.stop_all()
    server, home = tmp_path / "server", tmp_path / "a1"
    loose = [server / "coordinator.db", server / "coordinator.db-wal", home / "agent.json"]
    os.chmod(server, 0o755)
    os.chmod(home, 0o755)
    for path in loose:
        if path.exists():
            os.chmod(path, 0o644)
    (server / "admin-token").write_text("unused\n")  # as 0.1 wrote it (the test's token is in the env)
    os.chmod(server / "admin-token", 0o644)
    cluster.agents.clear()
    cluster.start_coordinator()
    # Listed online at once: the restarted coordinator gives the agents it knew a grace period.
    agent = cluster.start_agent("a1", wait=False)
    wait_for(lambda: "now 0600" in agent.output(), what="the agent to tighten its credential")
    assert mode(server) == 0o700 and mode(home) == 0o700
    for path in [*loose, server / "admin-token"]:
        if path.exists():
            assert mode(path) == 0o600, path
    assert cluster.coordinator is not None
    assert f"{server} was readable by other users (mode 0755): now 0700" in cluster.coordinator.output()
    assert f"{home / 'agent.json'} was readable by other users (mode 0644): now 0600" in agent.output()


def test_an_agent_registers_with_a_token_file_and_no_token_in_argv(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    token_file = tmp_path / "join-token"
    token_file.write_text(cluster.join_token + "\n")
    token_file.chmod(0o600)
    home = tmp_path / "filed"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DSTACK_"))}
    log = tmp_path / "filed.log"
    with log.open("ab") as f:
        popen = subprocess.Popen(
            [
                *(PY, "-m", "dstack.agent", "--coordinator", cluster.address, "--join-token-file", str(token_file)),
                *("--home", str(home), "--name", "filed", "--runtime", "null", *cluster.transport_args()),
            ],
            stdout=f,
            stderr=f,
            env=env,
            cwd=REPO,
        )
    cluster.agents.append(Proc(popen, log))
    wait_for(
        lambda: any(a["name"] == "filed" and a["status"] == "online" for a in cluster.agents_json()),
        what="the agent to register with the token from its file",
    )
    cmdline = Path(f"/proc/{popen.pid}/cmdline").read_bytes()
    assert cluster.join_token.encode() not in cmdline
    assert "warning" not in log.read_text()
    assert mode(home / "agent.json") == 0o600


def test_local_mode_keeps_its_state_to_its_user(local: LocalMode, tmp_path: Path) -> None:
    project = write_project(tmp_path / "p", "workflows:\n  - name: w\n    provider: bash\n    commands: [true]\n")
    r = local.cli("ps", cwd=project)
    assert r.returncode == 0, r.stderr
    d = local.home / "local"
    assert mode(d) == 0o700
    wait_for(lambda: (d / "agent" / "agent.json").exists(), what="the local agent's credential")
    assert mode(d / "server") == 0o700 and mode(d / "server" / "coordinator.db") == 0o600
    assert mode(d / "agent") == 0o700 and mode(d / "agent" / "agent.json") == 0o600
    assert mode(d / "admin-token") == 0o600 and mode(d / "join-token") == 0o600


def test_an_untracked_dotenv_stays_on_the_users_machine(local: LocalMode, tmp_path: Path) -> None:
    """The path a user takes: a `.env` with a token beside the code; `dstack run` sends the code, not the token."""
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: look
            provider: bash
            commands: ["ls -a", "cat .env || echo no-dotenv-here"]
        """,
        {".env": f"GITHUB_TOKEN={TOKEN}\n", "train.py": "print(1)\n"},
    )
    r = local.cli("run", "look", cwd=project)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "left out .env: untracked files that look like credentials" in r.stderr
    assert "no-dotenv-here" in r.stdout and "train.py" in r.stdout
    assert TOKEN not in r.stdout + r.stderr
