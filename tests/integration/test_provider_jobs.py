"""Issue 13 item 9's last piece: a 2022 providers.yaml program that produces several jobs.

The program imports the compat `dstack` (agent/provider_compat), whose `Provider.start()` writes its jobs to a
file; the agent reads it when the program exits 0 and reports the jobs with DONE; the coordinator adds them
to the run in the step that records the program done (coordinator/provided_jobs.py). Every attack below runs
against real processes: the program's own file is hostile, and so may be an agent.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
from pathlib import Path

import grpc
import pytest

from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from tests.conftest import Cluster, LocalMode, search, write_project

pytestmark = pytest.mark.integration

PROVIDERS_YAML = """
providers:
  - name: pipeline
    image: python:3.11
    commands:
      - python3 provider.py
"""
# Written against 2022's API (dstackai/dstack 007d79a cli/dstack/__init__.py): `Job(image, commands, artifacts,
# depends_on)`, `self.workflow.data` the workflow's fields.
PROVIDER_PY = """
from dstack import Job, Provider


class Pipeline(Provider):
    def create_jobs(self):
        rows = int(self.workflow.data.get("rows", 3))
        prepare = Job(
            image="python:3.11",
            commands=[f"mkdir -p data && seq {rows} > data/rows.txt", "echo prepare wrote $(wc -l < data/rows.txt)"],
            artifacts=["data"],
        )
        train = Job(
            image="python:3.11",
            commands=["echo train read $(paste -sd+ data/rows.txt | bc)", "mkdir -p model", "echo m > model/m.txt"],
            artifacts=["model"],
            depends_on=[prepare],
        )
        return [prepare, train]


if __name__ == "__main__":
    Pipeline().start()
"""


def _git_repo(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    env = {"PATH": "/usr/bin:/bin", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t"}
    env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "provider"]):
        subprocess.run(["git", *args], cwd=path, check=True, env=env)
    return path


def _run(local: LocalMode, project: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    r = local.cli("run", "hello", cwd=project, timeout=300)
    name = search(r"(\S+) submitted", r.stderr).group(1)
    [run] = [x for x in json.loads(local.cli("ps", "-a", "--json", cwd=project).stdout) if x["name"] == name]
    return r, run


def test_a_provider_program_from_a_file_repository_adds_two_dependent_jobs(local: LocalMode, tmp_path: Path) -> None:
    repo = _git_repo(tmp_path / "provider-repo", {".dstack/providers.yaml": PROVIDERS_YAML, "provider.py": PROVIDER_PY})
    project = write_project(
        tmp_path / "p",
        f"workflows:\n  - name: hello\n    provider: {{name: pipeline, repo: 'file://{repo}'}}\n    rows: 4\n",
    )
    r, run = _run(local, project)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert run["status"] == "done"
    jobs = {(j["name"], j["status"]) for j in run["jobs"]}  # type: ignore[attr-defined]
    assert jobs == {("hello", "done"), ("hello-1", "done"), ("hello-2", "done")}
    assert "hello-1 | prepare wrote 4\n" in r.stdout
    assert "hello-2 | train read 10\n" in r.stdout  # the first's artifact, received by the second
    assert "hello-1 | train" not in r.stdout and "hello-2 | prepare" not in r.stdout
    listed = json.loads(local.cli("artifacts", "list", run["name"], "--json", cwd=project).stdout)  # type: ignore[arg-type]
    assert sorted((f["job"], f["path"]) for f in listed) == [("hello-1", "data/rows.txt"), ("hello-2", "model/m.txt")]


# Hostile programs: each writes its jobs file by hand (the file is the job's own writing, trusted by nobody).
OPEN = "import json, os\npath = os.environ['DSTACK_PROVIDER_JOBS_FILE']\n"
HOSTILE = {
    # name -> (the program, what its job's failure says)
    "many": (
        "open(path, 'w').write(json.dumps({'jobs': [{'commands': ['true']}] * 10000}))",
        "create_jobs() returned 10000 jobs; at most 64",
    ),
    "huge": ("f = open(path, 'w')\nf.write('{\"jobs\": [')\nf.truncate(100 << 20)", "is larger than 1048576 bytes"),
    "malformed": ("open(path, 'w').write('{\"jobs\": [{\"commands\": ')", "is not valid JSON"),
    "wrongtype": ("open(path, 'w').write(json.dumps({'jobs': [{'commands': 'rm -rf /'}]}))", "commands must be a list"),
    "escape": (
        "open(path, 'w').write(json.dumps({'jobs': [{'commands': ['true'], 'artifacts': ['../../../etc']}]}))",
        "must be relative and stay inside the working directory",
    ),
    "outside": (
        "open(path, 'w').write(json.dumps({'jobs': [{'commands': ['true'], 'working_dir': '../..'}]}))",
        "must be relative and stay inside the code",
    ),
    "cycle": ("open(path, 'w').write(json.dumps({'jobs': [{'depends_on': [1]}, {'depends_on': [0]}]}))", "in a cycle"),
    "link": ("os.symlink('/etc/passwd', path)", "is a link"),
    # good jobs, then a failure: nothing is added
    "exits": ("open(path, 'w').write(json.dumps({'jobs': [{'commands': ['echo never']}]}))\nraise SystemExit(3)", ""),
}


# In CI: one of each kind (bounds, paths, exit status); the whole list with `pytest -m long` (each run costs a
# CLI submission: seconds apiece on a loaded 2-core machine).
CI_CASES = ("many", "escape", "exits")


def test_hostile_provider_programs_add_no_jobs(cluster: Cluster, tmp_path: Path) -> None:
    """Every hostile jobs file fails its program's job with a message that says what was wrong, and adds
    nothing to the run; a program that writes good jobs and then exits non-zero adds none either."""
    _run_hostile(cluster, tmp_path, CI_CASES)


@pytest.mark.long
def test_every_hostile_provider_program_adds_no_jobs(cluster: Cluster, tmp_path: Path) -> None:
    """The same with every case: 10,000 jobs, a 100 MB file, malformed JSON, wrong types, an artifact path or
    working_dir leaving the code, a dependency cycle, a link to /etc/passwd, good jobs then exit 3."""
    _run_hostile(cluster, tmp_path, tuple(HOSTILE))


def _run_hostile(cluster: Cluster, tmp_path: Path, cases: tuple[str, ...]) -> None:
    providers = "providers:\n" + "".join(
        f"  - name: {n}\n    image: python:3.11\n    commands: [python3 {n}.py]\n" for n in cases
    )
    workflows = "workflows:\n" + "".join(f"  - name: {n}\n    provider: {n}\n" for n in cases)
    files = {f"{n}.py": OPEN + HOSTILE[n][0] for n in cases}
    project = write_project(tmp_path / "p", workflows, {".dstack/providers.yaml": providers, **files})
    cluster.start_coordinator()
    cluster.start_agent()
    names = {}
    for n in cases:
        r = cluster.cli("run", "-d", n, cwd=project)
        assert r.returncode == 0, r.stderr
        names[n] = r.stdout.strip()
    for n, run_name in names.items():
        run = cluster.wait_status(run_name, {"done", "failed"}, timeout=120)
        assert run["status"] == "failed", (n, run)
        [job] = run["jobs"]  # nothing was added
        if n == "exits":
            assert job["message"] == "exited with code 3", job
        else:
            assert HOSTILE[n][1] in (job["message"] or ""), (n, job)
            assert job["termination_reason"] == "executor error", job
    if "link" in names:
        assert "root:" not in cluster.cli("logs", names["link"], cwd=project).stdout  # its target was never read


def test_an_agent_cannot_add_jobs_but_to_its_own_provider_jobs_done_once(cluster: Cluster, tmp_path: Path) -> None:
    """The jobs come with an agent's report, so an agent is the attacker here (raw gRPC, an agent token of its
    own): its provider job's DONE adds checked jobs once; replayed, another agent's report, a non-provider
    job's report and a name `..` add none."""
    cluster.start_coordinator()
    stub = agent_pb2_grpc.AgentServiceStub(cluster.channel())
    agents = []
    for name in ("raw", "other"):
        inv = common_pb2.Inventory(
            hostname=name, cpu_count=8, memory_total_bytes=8 << 30, runtime="host", max_jobs=16 if name == "raw" else 0
        )
        resp = stub.Register(
            agent_pb2.RegisterRequest(name=name, inventory=inv),
            metadata=[("authorization", f"Bearer {cluster.join_token}")],
        )
        agents.append((resp.agent_id, [("authorization", f"Bearer {resp.agent_token}")], inv))
    project = write_project(
        tmp_path / "p",
        "workflows:\n"
        + "".join(f"  - name: {n}\n    provider: gen\n" for n in ("good", "dotdot"))
        + '  - name: plain\n    provider: bash\n    commands: ["true"]\n',
        {".dstack/providers.yaml": 'providers:\n  - name: gen\n    image: python:3.11\n    commands: ["true"]\n'},
    )
    runs = {}
    for n in ("good", "dotdot", "plain"):
        r = cluster.cli("run", "-d", n, cwd=project)
        assert r.returncode == 0, r.stderr
        runs[n] = r.stdout.strip()

    (raw_id, raw_meta, raw_inv), (other_id, other_meta, other_inv) = agents
    with AgentStream(stub, raw_id, raw_meta, raw_inv) as raw:
        assigned = raw.assignments(3)
        wire = {a.run_name: a.job_id for a in assigned}
        good, dotdot, plain = (wire[runs[n]] for n in ("good", "dotdot", "plain"))

        def done(job: str, *names: str) -> agent_pb2.JobUpdate:
            u = agent_pb2.JobUpdate(job_id=job, status=common_pb2.JOB_STATUS_DONE, has_exit_code=True)
            u.termination_reason = common_pb2.TERMINATION_REASON_DONE
            for n in names:
                u.provided_jobs.add(job_name=n, commands=["true"], depends_on=["good-1"] if n == "good-2" else [])
            return u

        for job in (good, dotdot, plain):
            raw.send(agent_pb2.JobUpdate(job_id=job, status=common_pb2.JOB_STATUS_RUNNING))
        raw.send(done(good, "good-1", "good-2"), done(dotdot, ".."), done(plain, "plain-1"))
        raw.wait_acks({good, dotdot, plain}, common_pb2.JOB_STATUS_DONE)
        assert sorted(j["name"] for j in cluster.run_info(runs["good"])["jobs"]) == ["good", "good-1", "good-2"]

        raw.send(done(good, "evil"))  # replayed: the job is done already
        raw.wait_acks({good}, common_pb2.JOB_STATUS_DONE)
        with AgentStream(stub, other_id, other_meta, other_inv) as other:  # another agent's report of it
            other.send(done(good, "evil2"))
            other.wait_acks({good}, common_pb2.JOB_STATUS_DONE)
    assert sorted(j["name"] for j in cluster.run_info(runs["good"])["jobs"]) == ["good", "good-1", "good-2"]
    [refused] = cluster.wait_status(runs["dotdot"], {"failed"})["jobs"]
    assert "the provider's jobs are refused: invalid job name '..'" in (refused["message"] or ""), refused
    [plain_job] = cluster.wait_status(runs["plain"], {"failed"})["jobs"]
    assert "job 'plain' is not a provider program: it cannot add jobs" in (plain_job["message"] or ""), plain_job


class AgentStream:
    """An agent's Connect stream driven by hand: what to send goes through a queue."""

    def __init__(
        self,
        stub: agent_pb2_grpc.AgentServiceStub,
        agent_id: str,
        meta: list[tuple[str, str]],
        inv: common_pb2.Inventory,
    ) -> None:
        self.outgoing: queue.Queue[agent_pb2.AgentMessage | None] = queue.Queue()
        self.outgoing.put(agent_pb2.AgentMessage(hello=agent_pb2.Hello(agent_id=agent_id, inventory=inv)))
        self.call = stub.Connect(iter(self.outgoing.get, None), metadata=meta)
        self.replies: queue.Queue[agent_pb2.CoordinatorMessage] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            for reply in self.call:
                self.replies.put(reply)
        except grpc.RpcError:
            pass

    def __enter__(self) -> AgentStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.outgoing.put(None)
        self.call.cancel()
        self.reader.join(10)

    def send(self, *updates: agent_pb2.JobUpdate) -> None:
        self.outgoing.put(agent_pb2.AgentMessage(updates=list(updates)))

    def _next(self, what: str) -> agent_pb2.CoordinatorMessage:
        try:
            return self.replies.get(timeout=60)
        except queue.Empty:
            raise AssertionError(f"no message from the coordinator while waiting for {what}") from None

    def assignments(self, n: int) -> list[agent_pb2.JobAssignment]:
        got: list[agent_pb2.JobAssignment] = []
        while len(got) < n:
            got.extend(self._next(f"{n} assignments").assignments)
        return got

    def wait_acks(self, jobs: set[str], status: int) -> None:
        left = set(jobs)
        while left:
            left -= {a.job_id for a in self._next("acks").update_acks if a.status == status}
