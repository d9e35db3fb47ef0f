"""Repositories as namespaces, through the real CLI, coordinator and agent: two git repositories each tag
`latest` and each run's `deps: [{tag: latest}]` gets its own repository's artifacts; OWNER/REPO/NAME
reaches another repository's runs; what cannot be resolved says where it looked; a folder without git
works as before; and a database from before repositories keeps its runs and tags usable."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from dstack.coordinator.store.schema import MIGRATIONS
from tests.conftest import Cluster, search, write_project

pytestmark = pytest.mark.integration

A = "github.com/team/a"
B = "git.example.com/team/b"
# A token in a remote URL (a clone made with one) must never reach the repository's name or any output.
A_REMOTE = "https://x-access-token:ghp_Zz9SECRETtoken@github.com/Team/A.git"
B_REMOTE = "git@git.example.com:team/b.git"

WORKFLOWS = """
workflows:
  - name: download
    provider: bash
    commands: ['mkdir -p data && echo "data of {mark} from $RUN_NAME" > data/origin.txt']
    artifacts: [data]
  - name: train
    deps: [{{tag: latest}}]
    provider: bash
    commands: [cat data/origin.txt]
  - name: train-seed-syntax
    depends-on: ["download:latest"]
    provider: bash
    commands: [cat data/origin.txt]
"""
CROSS = """
  - name: b-by-tag
    depends-on: ["team/b/download:latest"]
    provider: bash
    commands: [cat data/origin.txt]
  - name: b-by-tag-form
    deps: [{tag: team/b/latest}]
    provider: bash
    commands: [cat data/origin.txt]
  - name: b-by-workflow
    deps: [{workflow: team/b/download}]
    provider: bash
    commands: [cat data/origin.txt]
  - name: ghost-repository
    deps: [{tag: ghost/repo/latest}]
    provider: bash
    commands: ["true"]
  - name: missing-tag
    deps: [{tag: nightly}]
    provider: bash
    commands: ["true"]
"""


def git_project(root: Path, remote: str, workflows: str) -> Path:
    write_project(root, workflows)
    for args in (["init", "-q"], ["remote", "add", "origin", remote]):
        subprocess.run(["git", "-c", "init.defaultBranch=main", *args], cwd=root, check=True, capture_output=True)
    return root


def submitted(stderr: str) -> str:
    return search(r"(\S+) submitted", stderr).group(1)


def ok(cluster: Cluster, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    r = cluster.cli(*args, cwd=root)
    assert r.returncode == 0, r.stderr
    return r


def test_two_repositories_each_tag_latest_and_reach_each_other_by_name(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # tables as wide as their cells: the CLI's environment is this one
    cluster.start_coordinator()
    cluster.start_agent()
    a = git_project(tmp_path / "a", A_REMOTE, WORKFLOWS.format(mark="a") + CROSS)
    b = git_project(tmp_path / "b", B_REMOTE, WORKFLOWS.format(mark="b"))

    a_run = submitted(ok(cluster, a, "run", "download", "-t", "latest").stderr)
    b_run = submitted(ok(cluster, b, "run", "download", "-t", "latest").stderr)  # the same tag: no conflict

    # each repository's `latest` is its own, in both dependency syntaxes
    for root, mark, run in ((a, "a", a_run), (b, "b", b_run)):
        for workflow in ("train", "train-seed-syntax"):
            assert f"data of {mark} from {run}" in ok(cluster, root, "run", workflow).stdout

    # tags list: the current repository's; --all: every one, with its repository
    listed = json.loads(ok(cluster, a, "tags", "list", "--json").stdout)
    assert [(t["name"], t["run"], t["repository"]) for t in listed] == [("latest", a_run, A)]
    listed = json.loads(ok(cluster, b, "tags", "list", "--json").stdout)
    assert [(t["name"], t["run"], t["repository"]) for t in listed] == [("latest", b_run, B)]
    everything = ok(cluster, a, "tags", "list", "--all").stdout
    assert "REPO" in everything and A in everything and B in everything

    # another repository's runs by OWNER/REPO/NAME: its tag (both syntaxes) and its workflow's last run
    for workflow in ("b-by-tag", "b-by-tag-form", "b-by-workflow"):
        assert f"data of b from {b_run}" in ok(cluster, a, "run", workflow).stdout, workflow

    # what cannot be resolved: an error at the workflow's line that says where it looked, nothing submitted
    before = len(cluster.runs())
    r = cluster.cli("run", "ghost-repository", cwd=a)
    assert r.returncode == 2 and "no repository 'ghost/repo'" in r.stderr and "workflows.yaml:" in r.stderr
    r = cluster.cli("run", "missing-tag", cwd=a)
    assert r.returncode == 2 and f"tag 'nightly' does not exist in repository {A}" in r.stderr
    assert len(cluster.runs()) == before

    # a tag moved by `run -t` in one repository leaves the other's alone
    a_second = submitted(ok(cluster, a, "run", "download", "-t", "latest").stderr)
    assert f"data of a from {a_second}" in ok(cluster, a, "run", "train").stdout
    assert f"data of b from {b_run}" in ok(cluster, b, "run", "train").stdout

    # dstack ps: a REPO column when the runs listed span repositories; --json always says it
    ps = ok(cluster, a, "ps", "-a").stdout
    assert ps.splitlines()[0].split()[:2] == ["RUN", "REPO"] and A in ps and B in ps
    runs = cluster.runs()
    assert {r["name"]: r["repository"] for r in runs}[a_run] == A
    assert {r["repository"] for r in runs} == {A, B}
    # the token in A's remote is nowhere: not in the name, not in any output
    assert "ghp_Zz9SECRET" not in json.dumps(runs) + ps + everything

    # tags delete: the current repository's only, or OWNER/REPO/TAG
    ok(cluster, a, "tags", "delete", "latest")
    assert json.loads(ok(cluster, b, "tags", "list", "--json").stdout)[0]["run"] == b_run
    ok(cluster, a, "tags", "delete", "team/b/latest")
    assert json.loads(ok(cluster, a, "tags", "list", "--all", "--json").stdout) == []


def _downgrade_to_before_repositories(db_path: Path) -> None:
    """The database as a coordinator from before repositories left it: no runs.repository, tags keyed by name."""
    before = next(i for i, m in enumerate(MIGRATIONS) if "Repositories as namespaces" in (m.__doc__ or ""))
    conn = sqlite3.connect(db_path)
    for (index,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'runs' AND sql LIKE '%repository%'"
    ).fetchall():
        conn.execute(f'DROP INDEX "{index}"')
    conn.execute("ALTER TABLE runs DROP COLUMN repository")
    conn.execute("CREATE TABLE old_tags (name TEXT PRIMARY KEY, run_id TEXT, created_at INTEGER)")
    conn.execute("INSERT INTO old_tags SELECT name, run_id, created_at FROM tags")
    conn.execute("DROP TABLE tags")
    conn.execute("ALTER TABLE old_tags RENAME TO tags")
    conn.execute(f"PRAGMA user_version = {before}")
    conn.commit()
    conn.close()


def test_a_folder_without_git_works_and_an_upgraded_database_keeps_its_tags(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    root = write_project(tmp_path / "app", WORKFLOWS.format(mark="old"))

    # a folder without a remote: its own namespace, local/<user>/<folder>, as before
    old = submitted(ok(cluster, root, "run", "download", "-t", "latest").stderr)
    assert f"data of old from {old}" in ok(cluster, root, "run", "train").stdout
    assert {r["repository"] for r in cluster.runs()} == {"local/admin/app"}
    assert "REPO" not in ok(cluster, root, "ps", "-a").stdout.splitlines()[0]  # one repository: no column

    # the same database as a coordinator from before repositories wrote it, then upgraded
    assert cluster.coordinator is not None
    cluster.coordinator.terminate()
    _downgrade_to_before_repositories(tmp_path / "server" / "coordinator.db")
    cluster.start_coordinator()

    runs = cluster.runs()
    assert {r["name"] for r in runs} >= {old} and {r["repository"] for r in runs} == {"legacy"}
    listed = json.loads(ok(cluster, root, "tags", "list", "--all", "--json").stdout)
    assert [(t["name"], t["run"], t["repository"]) for t in listed] == [("latest", old, "legacy")]
    # the old tag still serves the folder's workflows (a name the repository lacks falls back to legacy)
    assert f"data of old from {old}" in ok(cluster, root, "run", "train").stdout
    # and a new `latest` in the folder's own repository takes precedence from then on
    new = submitted(ok(cluster, root, "run", "download", "-t", "latest").stderr)
    assert f"data of old from {new}" in ok(cluster, root, "run", "train").stdout
    ok(cluster, root, "tags", "delete", "legacy/latest")
    listed = json.loads(ok(cluster, root, "tags", "list", "--all", "--json").stdout)
    assert [(t["run"], t["repository"]) for t in listed] == [(new, "local/admin/app")]


def test_an_impostor_repository_and_forged_names_are_refused(cluster: Cluster, tmp_path: Path) -> None:
    """Someone publishes `team/b` on another host to catch `team/b/...` references: the reference becomes
    ambiguous and is refused with both candidates named, rather than resolving to either. And the names a
    client sends cannot reach into another user's folder namespace or carry terminal control characters."""
    import grpc

    from dstack.protos.v1 import client_pb2, client_pb2_grpc, common_pb2

    cluster.start_coordinator()
    cluster.start_agent()
    b = git_project(tmp_path / "b", B_REMOTE, WORKFLOWS.format(mark="b"))
    evil = git_project(tmp_path / "evil", "https://evil.example.org/team/b.git", WORKFLOWS.format(mark="evil"))
    a = git_project(tmp_path / "a", A_REMOTE, WORKFLOWS.format(mark="a") + CROSS)
    b_run = submitted(ok(cluster, b, "run", "download", "-t", "latest").stderr)
    assert f"data of b from {b_run}" in ok(cluster, a, "run", "b-by-tag").stdout  # one candidate: fine
    ok(cluster, evil, "run", "download", "-t", "latest")
    r = cluster.cli("run", "b-by-tag", cwd=a)
    assert r.returncode == 2, r.stderr
    assert "matches several repositories" in r.stderr and B in r.stderr and "evil.example.org/team/b" in r.stderr
    r = cluster.cli("run", "b-by-workflow", cwd=a)
    assert r.returncode != 0 and "matches several repositories" in r.stderr
    assert "data of evil" not in r.stdout

    stub = client_pb2_grpc.ClientServiceStub(cluster.channel())
    meta = [("authorization", f"Bearer {cluster.admin_token}")]
    job = common_pb2.JobSpec(job_name="main", workflow="w", provider="bash", commands=["true"])
    for forged in ("local/bob/app", "github.com/x/\x1b[2Jcleared", "legacy", "local/../app"):
        with pytest.raises(grpc.RpcError) as e:
            stub.SubmitRun(client_pb2.SubmitRunRequest(workflow="w", jobs=[job], repository=forged), metadata=meta)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, forged
    with pytest.raises(grpc.RpcError) as e:
        stub.ListTags(client_pb2.ListTagsRequest(repository="local/bob/app"), metadata=meta)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
