"""Least privilege for agents and their jobs, attacked with real processes.

- A rogue agent with a valid identity (registered with the join token through raw gRPC) tries to
  read another agent's run (code, artifacts, grants), to write into it, and to forge its log lines
  and status: every call is refused and `dstack logs` shows none of its text.
- A host-runtime job of an agent running as root runs as the job user: it cannot read the agent's
  credential, the coordinator's state or write into the agent's environment cache, and still saves
  its artifacts. A job's secret is in no file the agent wrote, nor in the agent's log.
"""

from __future__ import annotations

import json
import os
import pwd
import sqlite3
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, client_pb2, common_pb2
from tests.conftest import Cluster, search, wait_for, write_project
from tests.integration.test_docker import docker_agent

pytestmark = pytest.mark.integration

JOB_USER = "dstack-job"
# A line of /proc/self/cgroup naming one of the agent's job groups: a pooled one, or the job's own (limits).
IN_A_JOB_GROUP = "/dstack-[0-9a-f]{12}/(pool-[0-9a-f]+|$JOB_ID)$"
SECRET = "hf-token-5e2b9c1d7a"
DENIED = grpc.StatusCode.PERMISSION_DENIED

VICTIM = """
workflows:
  - name: build
    provider: bash
    commands:
      - mkdir -p out && echo weights > out/model.bin
    artifacts: ["out"]
  - name: train
    depends-on: [build]
    provider: bash
    commands:
      - echo "real line 1"
      - while [ ! -f "$GO_ON" ]; do sleep 0.1; done
      - echo "real line 2"
    artifacts: ["out"]
"""


def register_rogue(cluster: Cluster) -> tuple[agent_pb2_grpc.AgentServiceStub, str, list[tuple[str, str]]]:
    """A second agent, enrolled as any agent is: the join token buys it an identity of its own."""
    stub = agent_pb2_grpc.AgentServiceStub(cluster.channel())
    inv = common_pb2.Inventory(hostname="rogue", cpu_count=1, memory_total_bytes=1 << 30, runtime="null", max_jobs=1)
    resp = stub.Register(
        agent_pb2.RegisterRequest(name="rogue", inventory=inv),
        metadata=[("authorization", f"Bearer {cluster.join_token}")],
    )
    return stub, resp.agent_id, [("authorization", f"Bearer {resp.agent_token}")]


def refused(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        if isinstance(call, Iterator):
            list(call)
        else:
            raise AssertionError(f"not refused: {call}")
    return e.value.code()


def test_a_rogue_agent_cannot_read_write_or_forge_another_agents_run(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("agent-1")
    go_on = tmp_path / "go-on"
    root = write_project(tmp_path / "p", VICTIM.replace("$GO_ON", str(go_on)))
    r = cluster.cli("run", "train", "-d", cwd=root)
    assert r.returncode == 0, r.stderr
    name = search(r"(\S+) submitted", r.stderr).group(1)
    wait_for(lambda: "real line 1" in cluster.cli("logs", name).stdout, timeout=60, what="train to run")
    run = cluster.run_info(name)
    train = next(j["id"] for j in run["jobs"] if j["name"] == "train")
    code_hash = run["code"]["hash"]
    assert code_hash

    stub, rogue_id, meta = register_rogue(cluster)
    code = agent_pb2.GetCodeRequest(hash=code_hash)
    assert refused(stub.GetCode(code, metadata=meta)) == DENIED
    with pytest.raises(grpc.RpcError) as e:
        stub.GrantCode(code, metadata=meta)
    assert e.value.code() == DENIED
    artifact = client_pb2.DownloadArtifactRequest(run_name=name, job_name="build", path="out/model.bin")
    assert refused(stub.DownloadArtifact(artifact, metadata=meta)) == DENIED
    with pytest.raises(grpc.RpcError) as e:
        stub.GrantDownloads(agent_pb2.GrantDownloadsRequest(files=[artifact]), metadata=meta)
    assert e.value.code() == DENIED
    upload = iter([agent_pb2.UploadArtifactRequest(job_id=train, path="out/model.bin", data=b"poisoned")])
    with pytest.raises(grpc.RpcError) as e:
        stub.UploadArtifact(upload, metadata=meta)
    assert e.value.code() == DENIED
    with pytest.raises(grpc.RpcError) as e:
        grant = agent_pb2.GrantUploadsRequest(job_id=train, files=[common_pb2.FileSize(path="out/x", size=1)])
        stub.GrantUploads(grant, metadata=meta)
    assert e.value.code() == DENIED

    # Its stream: forged lines for the victim's running job (the ones it already sent and the
    # ones to come), its final status, and lines of a job that does not exist.
    forged = [common_pb2.LogLine(seq=s, stream=common_pb2.LOG_STREAM_STDOUT, text=f"FORGED {s}") for s in range(1, 6)]
    ghost = [common_pb2.LogLine(seq=1, stream=common_pb2.LOG_STREAM_STDOUT, text="GHOST")]
    messages = [
        agent_pb2.AgentMessage(hello=agent_pb2.Hello(agent_id=rogue_id)),
        agent_pb2.AgentMessage(
            logs=[agent_pb2.LogBatch(job_id=train, lines=forged), agent_pb2.LogBatch(job_id="no-such-job", lines=ghost)]
        ),
        agent_pb2.AgentMessage(
            updates=[
                agent_pb2.JobUpdate(
                    job_id=train,
                    status=common_pb2.JOB_STATUS_DONE,
                    termination_reason=common_pb2.TERMINATION_REASON_DONE,
                    has_exit_code=True,
                )
            ]
        ),
    ]
    acked: set[str] = set()
    done = threading.Event()
    call = stub.Connect(send_then_wait(messages, done), metadata=meta)
    for reply in call:
        acked.update(a.job_id for a in reply.log_acks)
        acked.update("update:" + a.job_id for a in reply.update_acks)
        if {train, "no-such-job", "update:" + train} <= acked:
            break
    done.set()
    call.cancel()

    assert cluster.run_info(name)["status"] == "running"  # its DONE changed nothing
    go_on.touch()
    assert cluster.wait_status(name, {"done"}, timeout=60)["status"] == "done"
    logs = cluster.cli("logs", name).stdout
    assert "real line 1" in logs and "real line 2" in logs
    assert "FORGED" not in logs and "GHOST" not in logs
    db = sqlite3.connect(f"file:{cluster.tmp / 'server' / 'coordinator.db'}?mode=ro", uri=True)
    assert db.execute("SELECT COUNT(*) FROM log_chunks WHERE job_id = 'no-such-job'").fetchone() == (0,)
    # A chunk's body holds its lines' text as UTF-8 bytes (serialized LogLine messages).
    assert db.execute("SELECT COUNT(*) FROM log_chunks WHERE instr(body, CAST('FORGED' AS BLOB))").fetchone() == (0,)
    db.close()
    coordinator_log = cluster.coordinator.output() if cluster.coordinator else ""
    assert f"agent {rogue_id} sent 5 log line(s) for job {train}" in coordinator_log
    assert f"agent {rogue_id} sent a status update for job {train}" in coordinator_log
    assert f"agent {rogue_id} was refused code {code_hash[:12]}" in coordinator_log


def send_then_wait(messages: list[agent_pb2.AgentMessage], done: threading.Event) -> Iterator[agent_pb2.AgentMessage]:
    """The rogue's side of its stream: its messages, then an open stream until the test is done."""
    yield from messages
    done.wait(60)


@pytest.fixture
def job_user(tmp_path: Path) -> str:
    """The job user, created as deploy/install.sh does; the test's folders made passable for it
    (pytest makes them 0700), as /var/lib/dstack is."""
    if os.geteuid() != 0:
        pytest.skip("the agent switches to a job user only as root")
    try:
        pwd.getpwnam(JOB_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", JOB_USER], check=True
        )
    for folder in (tmp_path, *tmp_path.parents):
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
    return JOB_USER


def files_under(folder: Path) -> Iterator[Path]:
    for top, _, files in os.walk(folder):
        for f in files:
            yield Path(top) / f


def test_a_host_job_runs_as_the_job_user_and_cannot_reach_the_agents_secrets(
    cluster: Cluster, tmp_path: Path, job_user: str
) -> None:
    cluster.start_coordinator()
    assert cluster.cli("secrets", "add", "HF_TOKEN", SECRET).returncode == 0
    agent = cluster.start_agent("agent-1", "--job-user", job_user)
    home = cluster.tmp / "agent-1"
    state = cluster.tmp / "server"
    root = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: probe
            provider: bash
            commands:
              - echo "as $(id -un)"
              - echo "ids $(id -u):$(id -g):$(id -G)"
              - cat {home}/agent.json && echo "LEAK credential" || echo "denied credential"
              - ls {state} && echo "LEAK state" || echo "denied state"
              - touch {home}/envs/poison && echo "LEAK envs" || echo "denied envs"
              - cat /proc/{agent.popen.pid}/environ && echo "LEAK environ" || echo "denied environ"
              - touch "$HOME/.cache-ok" && echo "home writable"
              - echo "secret of ${{#HF_TOKEN}} characters"
              - grep -Eq "{IN_A_JOB_GROUP}" /proc/self/cgroup && echo "in its cgroup" || echo "not in its cgroup"
              - mkdir -p out && echo saved > out/result.txt
            artifacts: ["out"]
        """,
    )
    r = cluster.cli("run", "probe", cwd=root)
    assert r.returncode == 0, r.stderr + r.stdout
    out = r.stdout
    assert f"as {job_user}" in out
    # setpriv is given names (agent/jobuser.py): exactly the job user's ids, and no supplementary group.
    pw = pwd.getpwnam(job_user)
    assert f"ids {pw.pw_uid}:{pw.pw_gid}:{pw.pw_gid}\n" in out, out
    for what in ("credential", "state", "envs", "environ"):
        assert f"denied {what}" in out and f"LEAK {what}" not in out, out
    assert "home writable" in out
    assert f"secret of {len(SECRET)} characters" in out  # the job had it
    if "cannot limit" not in out:  # a host with writable cgroups: the agent moved the job into a job group
        assert "in its cgroup" in out and "not in its cgroup" not in out, out
    name = search(r"(\S+) submitted", r.stderr).group(1)
    listed = json.loads(cluster.cli("artifacts", "list", name, "--json").stdout)
    assert [a["path"] for a in listed] == ["out/result.txt"]

    # The agent's own files stay its own.
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "agent.json").stat().st_mode) == 0o600
    assert (home / "agent.json").stat().st_uid == 0
    assert stat.S_IMODE((cluster.tmp / "agent-1-jobs").stat().st_mode) == 0o711
    assert not (home / "envs" / "poison").exists()

    # The secret is in no file the agent wrote (job folders are removed once the job ends), nor in its log.
    def job_folders_gone() -> bool:
        return not [p for p in (cluster.tmp / "agent-1-jobs").iterdir() if p.name != ".envs"]

    wait_for(job_folders_gone, what="the job's folder to be removed")
    cluster.stop_all()
    for f in [*files_under(home), *files_under(cluster.tmp / "agent-1-jobs"), agent.log]:
        assert SECRET.encode() not in f.read_bytes(), f


def test_the_agent_refuses_to_start_with_a_job_user_it_cannot_use(cluster: Cluster, job_user: str) -> None:
    cluster.start_coordinator()
    missing = cluster.start_agent("agent-1", "--job-user", "no-such-user-here", wait=False)
    assert wait_for(lambda: missing.popen.poll(), what="the agent to exit") == 2
    assert "`useradd --system" in missing.output() and "no-such-user-here" in missing.output()

    # A home whose parent the job user cannot pass through fails at start, not at every job.
    closed = cluster.tmp / "closed"
    closed.mkdir(mode=0o700)
    proc = cluster.start_agent("agent-2", "--job-user", job_user, "--home", str(closed / "agent"), wait=False)
    assert wait_for(lambda: proc.popen.poll(), what="the agent to exit") == 2
    assert f"cannot reach {closed / 'agent-jobs'}" in proc.output() and "chmod o+x" in proc.output()


def processes_showing(value: str) -> list[str]:
    """Command lines of this host's processes that hold `value` (what `ps` shows every user)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if value.encode() in cmdline:
                found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


@pytest.mark.parametrize("runtime", ["host", "docker"])
def test_a_running_jobs_secret_is_in_no_command_line_file_or_log_of_the_agent(
    cluster: Cluster, tmp_path: Path, request: pytest.FixtureRequest, runtime: str
) -> None:
    cluster.start_coordinator()
    assert cluster.cli("secrets", "add", "HF_TOKEN", SECRET).returncode == 0
    home = cluster.tmp / "agent-1"
    if runtime == "docker":
        docker_agent(cluster, request.getfixturevalue("dockerd"))
        flag_dir = "/workflow"
    else:
        cluster.start_agent("agent-1")
        flag_dir = "."
    agent = cluster.agents[-1]
    root = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: hold
            provider: bash
            commands:
              - echo "secret of ${{#HF_TOKEN}} characters"
              - while [ ! -f {flag_dir}/go ]; do sleep 0.1; done
        """,
    )
    r = cluster.cli("run", "hold", "-d", cwd=root)
    assert r.returncode == 0, r.stderr
    name = search(r"(\S+) submitted", r.stderr).group(1)
    wait_for(lambda: f"secret of {len(SECRET)}" in cluster.cli("logs", name).stdout, timeout=60, what="the job")
    assert processes_showing(SECRET) == []
    job_id = cluster.run_info(name)["jobs"][0]["id"]
    (home / "jobs" / job_id / "go").touch()
    assert cluster.wait_status(name, {"done"}, timeout=60)["status"] == "done"
    wait_for(lambda: not (home / "jobs" / job_id).exists(), what="the job's folder to be removed")
    cluster.stop_all()
    for f in [*files_under(home), agent.log]:
        assert SECRET.encode() not in f.read_bytes(), f
