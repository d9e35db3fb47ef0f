"""The run record end to end (docs/reproducibility.md): the real CLI, coordinator and agents.

- A run made from a dirty git tree with untracked files: `dstack code RUN -o DIR` restores the tree the
  job saw byte for byte (contents, exec bits, symlinks), `--diff` prints `git diff HEAD --binary`, and the
  remote's token is in no part of the record.
- `dstack show --json` has each field for a python job with requirements (a wheel made here, offline),
  and for a docker job the image ID the agent ran.
- Attacks: a rogue agent sends an oversized, hostile environment for the job it was given (megabytes of
  packages, terminal escapes, a thousand GPUs, made-up phases, absurd times): the record keeps a bounded,
  cleaned copy. A job swaps its environment report for a link to the agent's credential: not read.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from tests.conftest import PY, Cluster, free_port, search, write_project
from tests.tinywheel import build_wheel, offline_requirements

pytestmark = pytest.mark.integration

TOKEN = "ghp_s3cr3tT0k3n"


def git(root: Path, *args: str) -> bytes:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@e", *args], cwd=root, check=True, capture_output=True
    ).stdout


def submitted(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return search(r"(\S+) submitted", r.stderr).group(1)


def show(cluster: Cluster, name: str) -> dict[str, Any]:
    r = cluster.cli("show", name, "--json")
    assert r.returncode == 0, r.stderr
    record: dict[str, Any] = json.loads(r.stdout)
    return record


def tree(root: Path) -> dict[str, tuple[str, bytes | str, bool]]:
    """path -> (kind, content or link target, executable) of every file under root but .git."""
    out: dict[str, tuple[str, bytes | str, bool]] = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".git" and not (Path(dirpath) / d).is_symlink()]
        for name in files + [d for d in os.listdir(dirpath) if (Path(dirpath) / d).is_symlink() and d not in files]:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel.startswith(".git/"):
                continue
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p), False)
            else:
                out[rel] = ("file", p.read_bytes(), bool(st.st_mode & 0o111))
    return out


def dirty_project(root: Path) -> Path:
    write_project(
        root,
        """
        workflows:
          - name: look
            provider: bash
            commands:
              - ls -la
        """,
        {"train.py": "print('v1')\n", "data/keep.txt": "keep\n", "gone.txt": "to be deleted\n"},
    )
    (root / "blob.bin").write_bytes(bytes(range(256)) * 4)
    git(root, "-c", "init.defaultBranch=main", "init", "-q")
    git(root, "remote", "add", "origin", f"https://alice:{TOKEN}@github.com/org/repo.git")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "first")
    # Uncommitted: a changed text file, a changed binary file, a deleted file, a mode change;
    # untracked: a script (executable), a file in a new folder, a symlink.
    (root / "train.py").write_text("print('v2, not committed')\n")
    (root / "blob.bin").write_bytes(bytes(reversed(range(256))) * 4 + b"\x00\xff")
    (root / "gone.txt").unlink()
    (root / "data" / "keep.txt").chmod(0o755)
    (root / "run.sh").write_text("#!/bin/sh\necho untracked\n")
    (root / "run.sh").chmod(0o755)
    (root / "notes").mkdir()
    (root / "notes" / "idea.md").write_text("untracked idea\n")
    (root / "latest").symlink_to("train.py")
    return root


def test_code_restores_a_dirty_tree_byte_for_byte_and_prints_its_diff(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("a1")
    project = dirty_project(tmp_path / "p")
    expected_diff = git(project, "diff", "HEAD", "--binary", "--no-color", "--no-ext-diff")
    name = submitted(cluster.cli("run", "look", "-d", cwd=project))
    cluster.wait_status(name, {"done"}, timeout=120)

    out = tmp_path / "restored"
    r = cluster.cli("code", name, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert tree(out) == tree(project)  # contents, exec bits, links; the deleted file stays deleted
    assert not (out / "gone.txt").exists()

    printed = subprocess.run(
        [PY, "-m", "dstack.cli", "code", name, "--diff"], capture_output=True, env=cluster.env(), check=False
    )
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == expected_diff  # bytes: the binary part as git wrote it
    assert b"v2, not committed" in printed.stdout and b"GIT binary patch" in printed.stdout

    # The diff applies to the commit and, with the untracked files, gives the tree back.
    clean = tmp_path / "clean"
    subprocess.run(["git", "clone", "-q", str(project), str(clean)], check=True)
    subprocess.run(["git", "apply", "--binary", "-"], input=printed.stdout, cwd=clean, check=True)
    record = show(cluster, name)
    code = record["code"]
    for untracked in code["untracked"]:
        src = out / untracked
        dest = clean / untracked
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dest.symlink_to(os.readlink(src))
        else:
            dest.write_bytes(src.read_bytes())
            dest.chmod(src.stat().st_mode)
    assert tree(clean) == tree(project)

    assert sorted(code["untracked"]) == ["latest", "notes/idea.md", "run.sh"]
    assert code["dirty"] is True and len(code["commit"]) == 40 and code["branch"] == "main"
    assert code["repo_url"] == "https://github.com/org/repo.git"
    assert TOKEN not in json.dumps(record)


PYTHON_WORKFLOWS = """
workflows:
  - name: prepare
    provider: bash
    commands:
      - mkdir -p data && echo "rows ${{ rows }}" > data/rows.txt
    artifacts: ["data"]
  - name: train
    provider: python
    depends-on: [prepare]
    file: train.py
    requirements: requirements.txt
    resources:
      gpu: 1
    artifacts: ["model"]
"""
TRAIN_PY = """
import os, tinypkg
os.makedirs("model", exist_ok=True)
open("model/weights.txt", "w").write(open("data/rows.txt").read() + str(tinypkg.VALUE))
"""


def test_show_json_has_each_field_of_a_python_job(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("gpu-box", "--simulate-gpus", "2xA100-80GB")
    project = write_project(
        tmp_path / "p",
        PYTHON_WORKFLOWS,
        {
            "train.py": TRAIN_PY,
            "requirements.txt": offline_requirements("wheels", "tinypkg"),
            ".dstack/variables.yaml": "variables:\n  prepare:\n    rows: 10\n",
        },
    )
    build_wheel(project / "wheels")
    name = submitted(cluster.cli("run", "train", "--rows", "7", "-d", cwd=project))
    run = cluster.wait_status(name, {"done", "failed"}, timeout=300)
    assert run["status"] == "done", cluster.cli("logs", name).stdout[-3000:]

    record = show(cluster, name)
    assert record["version"] == "dstack.run-record/v1"
    assert record["run"]["name"] == name and record["run"]["workflow"] == "train"
    assert record["run"]["args"] == ["--rows", "7"]
    resolved = record["resolved_workflow"]
    assert resolved["prepare"]["variables"]["rows"] in (7, "7")  # the override, not the default
    assert any('echo "rows 7"' in c for c in resolved["prepare"]["workflow"]["commands"])
    jobs = {j["job_name"]: j for j in record["jobs"]}
    prepare, train = jobs["prepare"], jobs["train"]
    assert train["spec"]["provider"] == "python" and train["spec"]["resources"]["gpu"]["count"] == 1
    assert train["exit_code"] == 0 and train["status"] == "done" and train["agent"] == "gpu-box"
    env = train["environment"]
    assert env["runtime"] == "host"
    assert "tinypkg==1.0" in env["packages"].splitlines()
    assert env["python_version"].count(".") == 2 and env["os"]
    assert [g["simulated"] for g in env["gpus"]] == [True]
    assert "A100" in env["gpus"][0]["name"] and env["gpus"][0]["index"] == train["gpu_indices"][0]
    assert env["driver_version"] == ""  # simulated: no driver to speak of
    timings = train["timings_s"]
    assert {"queued", "code", "inputs", "setup", "environment", "running", "uploading", "total"} <= set(timings)
    assert all(v >= 0 for v in timings.values())
    # Inputs by manifest hash: the train job took exactly what prepare saved.
    assert prepare["artifacts"]["manifest_hash"]
    assert train["inputs"] == [
        {"run": name, "job": "prepare", "manifest_hash": prepare["artifacts"]["manifest_hash"], "files": 1}
    ]
    assert [f["path"] for f in train["artifacts"]["files"]] == ["model/weights.txt"]
    assert prepare["environment"]["packages"] == ""  # bash: no Python environment
    assert ".dstack-env-report.json" not in json.dumps(train["artifacts"])

    r = cluster.cli("show", name)
    assert r.returncode == 0, r.stderr
    for text in (name, "tinypkg==1.0", "A100", "(simulated)", "manifest", "queued"):
        assert text in r.stdout, r.stdout


def test_show_json_has_the_image_id_a_docker_job_ran(cluster: Cluster, dockerd: Any, tmp_path: Path) -> None:
    import docker

    from tests.dockerd import BUSYBOX
    from tests.integration.test_docker import docker_agent

    cluster.start_coordinator()
    docker_agent(cluster, dockerd)
    project = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: hello
            provider: docker
            image: {BUSYBOX}
            commands:
              - echo hello
        """,
    )
    name = submitted(cluster.cli("run", "hello", "-d", cwd=project))
    assert cluster.wait_status(name, {"done", "failed"}, timeout=180)["status"] == "done"
    env = show(cluster, name)["jobs"][0]["environment"]
    image = docker.DockerClient(base_url=dockerd.host).images.get(BUSYBOX)
    assert env["runtime"] == "docker" and env["image"] == BUSYBOX
    assert env["image_id"] == image.id and env["image_id"].startswith("sha256:")
    assert env["image_digests"] == list(image.attrs.get("RepoDigests") or [])
    assert env["os"].startswith("linux/")


def rogue_stream(messages: Iterator[agent_pb2.AgentMessage], done: threading.Event) -> Iterator[agent_pb2.AgentMessage]:
    yield from messages
    done.wait(60)


def test_a_rogue_agents_hostile_environment_is_bounded_and_cleaned(cluster: Cluster, tmp_path: Path) -> None:
    http_port = free_port()
    cluster.start_coordinator("--http-port", str(http_port))
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: tiny
            provider: bash
            commands: ["true"]
        """,
    )
    name = submitted(cluster.cli("run", "tiny", "-d", cwd=project))
    stub = agent_pb2_grpc.AgentServiceStub(cluster.channel(options=[("grpc.max_send_message_length", 64 << 20)]))
    inv = common_pb2.Inventory(hostname="rogue", cpu_count=4, memory_total_bytes=8 << 30, runtime="host", max_jobs=1)
    reg = stub.Register(
        agent_pb2.RegisterRequest(name="rogue", inventory=inv),
        metadata=[("authorization", f"Bearer {cluster.join_token}")],
    )
    meta = [("authorization", f"Bearer {reg.agent_token}")]
    assigned = threading.Event()
    job_ids: list[str] = []
    outgoing: list[agent_pb2.AgentMessage] = [agent_pb2.AgentMessage(hello=agent_pb2.Hello(agent_id=reg.agent_id))]
    done = threading.Event()

    def messages() -> Iterator[agent_pb2.AgentMessage]:
        yield outgoing[0]
        assert assigned.wait(60), "no assignment for the rogue agent"
        job = job_ids[0]
        hostile = common_pb2.JobEnvironment(
            runtime="host\x1b[2J\x1b]0;pwned\x07",
            os="Linux \x1b[31mRED\x1b[0m\r\nforged line\u202e",
            python_version="3" * 10_000,
            packages="evil==1.0\n" * 400_000,  # 4 MB
            image_digests=[f"img@sha256:{i:064x}" for i in range(1000)],
            phase_ns={"running": -5, "uploading": 1 << 62, "made-up": 7, "code": 1_000_000},
            gpus=[common_pb2.GpuInfo(index=i, name="\x1b[5mH100", uuid="GPU-" + "x" * 5000) for i in range(1000)],
            driver_version="\x00" * 100 + "535",
        )
        yield agent_pb2.AgentMessage(updates=[agent_pb2.JobUpdate(job_id=job, status=common_pb2.JOB_STATUS_RUNNING)])
        yield agent_pb2.AgentMessage(
            updates=[
                agent_pb2.JobUpdate(
                    job_id=job,
                    status=common_pb2.JOB_STATUS_DONE,
                    termination_reason=common_pb2.TERMINATION_REASON_DONE,
                    has_exit_code=True,
                    environment=hostile,
                )
            ]
        )
        done.wait(60)

    call = stub.Connect(messages(), metadata=meta)
    try:
        for reply in call:
            for a in reply.assignments:
                job_ids.append(a.job_id)
                assigned.set()
            if any(a.status == common_pb2.JOB_STATUS_DONE for a in reply.update_acks):
                break
    finally:
        done.set()
        call.cancel()
    assert cluster.wait_status(name, {"done"}, timeout=60)["status"] == "done"

    record = show(cluster, name)
    env = record["jobs"][0]["environment"]
    text = json.dumps(record)
    for bad in ("\x1b", "\\u001b", "\\u0007", "\\r", "\\u202e", "\\u0000"):
        assert bad not in text, bad
    assert env["truncated"] is True and env["packages_truncated"] is True
    assert len(env["packages"]) <= 256 * 1024 and env["packages"].startswith("evil==1.0\n")
    assert len(env["python_version"]) <= 64 and len(env["image_digests"]) <= 16
    assert len(env["gpus"]) <= 64 and all(len(g["uuid"]) <= 128 for g in env["gpus"])
    assert set(env["phase_ns"]) == {"running", "uploading", "code"}  # the made-up phase is dropped
    assert env["phase_ns"]["running"] == 0 and env["phase_ns"]["uploading"] <= 10 * 365 * 24 * 3600 * 10**9
    assert env["driver_version"] == "535"
    r = cluster.cli("show", name)  # the readable view prints it without a terminal escape
    assert r.returncode == 0 and "\x1b]0;" not in r.stdout and "\x1b[2J" not in r.stdout

    # The HTTP API gives the same document.
    conn = http.client.HTTPSConnection(
        "127.0.0.1", http_port, context=ssl.create_default_context(cafile=str(cluster.ca_file)), timeout=60
    )
    conn.request("GET", f"/api/runs/{name}/record", headers={"Authorization": f"Bearer {cluster.admin_token}"})
    answer = conn.getresponse()
    assert answer.status == 200 and json.loads(answer.read()) == record
    conn.close()


HOSTILE_TRAIN = """
import os
report = os.environ["DSTACK_ENV_REPORT"]
os.remove(report)
os.symlink(os.path.join(os.environ["DSTACK_AGENT_HOME"], "agent.json"), report)
print("swapped")
"""


def test_a_job_cannot_make_the_agent_read_its_credential_into_the_record(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("a1")
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: swap
            provider: python
            file: swap.py
            requirements: requirements.txt
        """,
        {"swap.py": HOSTILE_TRAIN, "requirements.txt": offline_requirements("wheels", "tinypkg")},
    )
    build_wheel(project / "wheels")
    name = submitted(cluster.cli("run", "swap", "-d", cwd=project))
    run = cluster.wait_status(name, {"done", "failed"}, timeout=300)
    assert run["status"] == "done", cluster.cli("logs", name).stdout[-3000:]
    agent_token = json.loads((cluster.tmp / "a1" / "agent.json").read_text())["agent_token"]
    record = show(cluster, name)
    assert agent_token not in json.dumps(record)
    env = record["jobs"][0]["environment"]
    assert env["packages"] == "" and env["os"]  # the report was refused; the agent's own facts remain
