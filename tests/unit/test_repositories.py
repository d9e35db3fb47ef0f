"""Repositories as namespaces: remote URL normalisation, references, qualifier resolution, and the
migration that gives stored runs and tags a repository."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlite_utils

from dstack.coordinator.errors import Conflict, InvalidRequest, NotFound
from dstack.coordinator.model import RunStatus
from dstack.coordinator.repositories import resolve_qualifier, run_repository
from dstack.coordinator.store import NewJob, Store
from dstack.coordinator.store.schema import MIGRATIONS
from dstack.protos.repos import LEGACY, BadRef, Ref, repository_from_remote, split_ref
from dstack.protos.v1 import common_pb2


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # the three shapes of one GitHub remote, and their variations
        ("git@github.com:dstackai/dstack.git", "github.com/dstackai/dstack"),
        ("https://github.com/dstackai/dstack", "github.com/dstackai/dstack"),
        ("https://github.com/dstackai/dstack.git", "github.com/dstackai/dstack"),
        ("https://github.com/dstackai/dstack/", "github.com/dstackai/dstack"),
        ("ssh://git@github.com/dstackai/dstack", "github.com/dstackai/dstack"),
        ("ssh://git@github.com:22/dstackai/dstack.git", "github.com/dstackai/dstack"),
        ("git+ssh://git@github.com/dstackai/dstack.git", "github.com/dstackai/dstack"),
        ("git://github.com/dstackai/dstack.git", "github.com/dstackai/dstack"),
        ("  https://GitHub.com/DstackAI/Dstack.git\n", "github.com/dstackai/dstack"),  # case-insensitive host
        # credentials never reach the name
        ("https://x-access-token:ghp_abc123@github.com/org/repo.git", "github.com/org/repo"),
        ("https://ghp_abc123@github.com/org/repo", "github.com/org/repo"),
        ("https://oauth2:glpat-xyz@gitlab.com/group/sub/project.git", "gitlab.com/group/sub/project"),
        ("https://user:p@ss@github.com/org/repo", "github.com/org/repo"),  # an '@' in the password
        ("https://gitlab.com/org/repo.git?private_token=glpat-1#frag", "gitlab.com/org/repo"),
        ("ssh://user:secret@git.example.com/team/app.git", "git.example.com/team/app"),
        ("deploy:hunter2@git.example.com:team/app.git", "git.example.com/team/app"),
        # self-hosted: the host is lower-cased, the path keeps its case, the port goes
        ("https://Git.Example.COM:8443/Team/App.git", "git.example.com/Team/App"),
        ("git@git.example.com:Team/App", "git.example.com/Team/App"),
        ("ssh://git@[2001:db8::1]:2222/team/app.git", "[2001:db8::1]/team/app"),
        ("git@bitbucket.org:Team/Repo.git", "bitbucket.org/team/repo"),
        ("https://gitlab.com//group//repo.git//", "gitlab.com/group/repo"),
        ("https://git.example.com/team/../other/./app.git", "git.example.com/other/app"),
        # remotes on this machine
        ("/srv/git/app.git", "file/srv/git/app"),
        ("file:///srv/git/app.git", "file/srv/git/app"),
        # no repository: relative paths, nothing, a host without a path
        ("../app.git", None),
        ("./app", None),
        ("", None),
        ("https://github.com/", None),
        ("C:\\repos\\app", None),
    ],
)
def test_remote_urls_normalise(url: str, expected: str | None) -> None:
    assert repository_from_remote(url) == expected


def test_references_split() -> None:
    assert split_ref("latest") == Ref("", "latest")
    assert split_ref("org/repo/latest") == Ref("org/repo", "latest")
    assert split_ref("github.com/org/repo/download") == Ref("github.com/org/repo", "download")
    assert str(split_ref("org/repo/latest")) == "org/repo/latest"
    for bad in ("org/repo/", "/latest", "org//latest"):
        with pytest.raises(BadRef):
            split_ref(bad)


def test_run_repository() -> None:
    assert run_repository("github.com/org/repo", "", "alice") == "github.com/org/repo"
    # a folder's namespace is the user's own: the coordinator adds the name, a client cannot pick another's
    assert run_repository("local/app", "", "alice") == "local/alice/app"
    assert run_repository("local/my project", "", "bob") == "local/bob/my project"
    with pytest.raises(InvalidRequest, match="local/FOLDER"):
        run_repository("local/bob/app", "", "alice")
    for bad in ("github.com", "github.com//x", "a/../b", "a/b\nc", "x" * 400):
        with pytest.raises(InvalidRequest):
            run_repository(bad, "", "alice")
    # clients from before repositories: the code's remote, else legacy
    assert run_repository("", "https://tok@github.com/Org/Repo.git", "alice") == "github.com/org/repo"
    assert run_repository("", "", "alice") == LEGACY


def test_qualifier_resolution() -> None:
    known = ["github.com/org/repo", "gitlab.com/group/sub/app", "local/alice/app", "git.example.com/org/repo"]
    assert resolve_qualifier("sub/app", known) == "gitlab.com/group/sub/app"
    assert resolve_qualifier("Alice/App", known) == "local/alice/app"
    assert resolve_qualifier("github.com/org/repo", known) == "github.com/org/repo"  # whole names win
    with pytest.raises(InvalidRequest) as e:  # two hosts hold org/repo: refused, both listed
        resolve_qualifier("org/repo", known)
    assert "git.example.com/org/repo" in str(e.value) and "github.com/org/repo" in str(e.value)
    with pytest.raises(NotFound, match="no repository 'nobody/nothing'"):
        resolve_qualifier("nobody/nothing", known)
    with pytest.raises(NotFound):
        resolve_qualifier("repo", known)  # one component is no OWNER/REPO


def _done_run(s: Store, workflow: str, repository: str) -> str:
    spec = common_pb2.JobSpec(job_name=workflow).SerializeToString()
    created = s.create_run("admin", workflow, b"", "", [], [NewJob(workflow, spec, 0, 0, 0, [])], repository=repository)
    s.conn.execute("UPDATE jobs SET status = 6 WHERE run_id = ?", [created.run_id])
    s.conn.execute(
        "UPDATE runs SET status = ?, finished_at = ? WHERE id = ?", [int(RunStatus.DONE), s.clock(), created.run_id]
    )
    return created.name


def test_tags_are_per_repository(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    a = _done_run(s, "download", "github.com/team/a")
    b = _done_run(s, "download", "github.com/team/b")
    s.add_tag("latest", a)
    s.add_tag("latest", b)  # the same name in another repository: no conflict
    assert s.resolve_tag("github.com/team/a", "latest").run_name == a
    assert s.resolve_tag("github.com/team/b", "latest").run_name == b
    assert s.resolve_tag("github.com/team/a", "team/b/latest").run_name == b
    with pytest.raises(Conflict, match=r"github\.com/team/a"):
        s.add_tag("latest", a)
    with pytest.raises(NotFound, match=r"in repository github\.com/team/c"):
        s.resolve_tag("github.com/team/c", "latest")
    assert s.latest_done_run("github.com/team/b", "download").name == b
    assert s.latest_done_run("github.com/team/a", "team/b/download").name == b
    with pytest.raises(NotFound, match=r"in repository github\.com/team/c"):
        s.latest_done_run("github.com/team/c", "download")
    assert [t.repository for t in s.list_tags(None)] == ["github.com/team/a", "github.com/team/b"]
    with pytest.raises(InvalidRequest, match="several repositories"):  # a client that names no repository
        s.delete_tag(None, "latest")
    with pytest.raises(NotFound) as e:  # from another project: where the tag is, and how to name it
        s.delete_tag("local/admin/home", "latest")
    assert str(e.value) == (
        "tag 'latest' does not exist in repository local/admin/home (see `dstack tags list`); it is in"
        " github.com/team/a, github.com/team/b: delete it from that project, or as"
        " `dstack tags delete github.com/team/a/latest`"
    )
    s.delete_tag("github.com/team/a", "latest")
    assert [t.run_name for t in s.list_tags(None)] == [b]
    with pytest.raises(NotFound):
        s.delete_tag("github.com/team/a", "latest")
    s.delete_tag(None, "latest")  # in one repository only: that one
    assert s.list_tags(None) == []


def _migration_index() -> int:
    """Where the repositories migration is in the list (numbers shift as migrations are merged)."""
    return next(i for i, m in enumerate(MIGRATIONS) if "Repositories as namespaces" in (m.__doc__ or ""))


def test_migration_gives_stored_runs_and_tags_a_repository(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    db = sqlite_utils.Database(path)
    before = _migration_index()
    for m in MIGRATIONS[:before]:
        m(db)
    db.execute(f"PRAGMA user_version = {before}")
    conn = db.conn
    runs = [  # id, name, workflow, remote
        ("r1", "old-cat-1", "download", "https://tok:x@github.com/Team/A.git"),
        ("r2", "old-cat-2", "download", ""),
        ("r3", "old-cat-3", "train", "git@git.example.com:team/b.git"),
    ]
    for rid, name, wf, url in runs:
        code = common_pb2.CodeRef(hash="h", repo_url=url).SerializeToString()
        conn.execute(
            "INSERT INTO runs (id, name, owner, workflow, status, submitted_at, finished_at, code) VALUES"
            " (?, ?, 'admin', ?, ?, 1, 2, ?)",
            [rid, name, wf, int(RunStatus.DONE), code],
        )
    conn.executemany("INSERT INTO tags (name, run_id, created_at) VALUES (?, ?, 3)", [("latest", "r1"), ("data", "r2")])
    conn.commit()
    db.close()

    s = Store(path)
    repos = dict(s.conn.execute("SELECT name, repository FROM runs").fetchall())
    assert repos == {"old-cat-1": "github.com/team/a", "old-cat-2": LEGACY, "old-cat-3": "git.example.com/team/b"}
    tags = {t.name: (t.repository, t.run_name) for t in s.list_tags(None)}
    assert tags == {"latest": ("github.com/team/a", "old-cat-1"), "data": (LEGACY, "old-cat-2")}
    # old tags still resolve: in their repository, and a legacy one from a folder without a remote that
    # lacks the name (where such runs came from); a repository with a remote never reads legacy unasked
    assert s.resolve_tag("github.com/team/a", "latest").run_name == "old-cat-1"
    assert s.resolve_tag("local/alice/app", "data").run_name == "old-cat-2"
    assert s.latest_done_run("local/alice/app", "download").name == "old-cat-2"
    with pytest.raises(NotFound, match=r"in repository git\.example\.com/team/b"):
        s.resolve_tag("git.example.com/team/b", "data")
    assert s.resolve_tag("git.example.com/team/b", "legacy/data").run_name == "old-cat-2"
    # and the schema now keys tags by repository
    with pytest.raises(sqlite3.IntegrityError):
        s.conn.execute(
            "INSERT INTO tags (repository, name, run_id, created_at) VALUES (?, 'latest', 'r3', 4)",
            ["github.com/team/a"],
        )
    s.conn.execute(
        "INSERT INTO tags (repository, name, run_id, created_at) VALUES (?, 'latest', 'r3', 4)",
        ["git.example.com/team/b"],
    )
    s.close()
    Store(path).close()  # migrating again is a no-op


def test_migration_resumes_after_a_crash_between_drop_and_rename(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    db = sqlite_utils.Database(path)
    before = _migration_index()
    for m in MIGRATIONS[:before]:
        m(db)
    db.execute("INSERT INTO runs (id, name, owner, workflow, status, submitted_at) VALUES ('r', 'n', 'o', 'w', 5, 1)")
    db.execute("INSERT INTO tags (name, run_id, created_at) VALUES ('t', 'r', 1)")
    MIGRATIONS[before](db)  # then undo its last step: as if it had died after the drop
    db.execute("ALTER TABLE tags RENAME TO tags_by_repository")
    db.execute(f"PRAGMA user_version = {before}")
    db.conn.commit()
    db.close()
    s = Store(path)
    assert [(t.repository, t.name) for t in s.list_tags(None)] == [(LEGACY, "t")]
    s.close()


# ---- the CLI: qualified dependencies, and the repository of the current project -------------------------
def _deps(tmp_path: Path, lines: str) -> tuple[list[str], list[str], list[str], dict[str, str]]:
    from dstack.cli.workflows import dependencies, load_workflow_nodes

    (tmp_path / ".dstack").mkdir(exist_ok=True)
    (tmp_path / ".dstack" / "workflows.yaml").write_text(
        f"workflows:\n  - name: t\n    provider: bash\n    commands: [x]\n{lines}"
    )
    d = dependencies(load_workflow_nodes(tmp_path)["t"])
    return d.runtime, d.tags, d.workflows, d.tag_workflows


def test_qualified_dependencies_parse(tmp_path: Path) -> None:
    runtime, tags, workflows, expected = _deps(
        tmp_path,
        '    depends-on: [prep, "download:latest", "org/repo/download:v1", "org/repo/prep"]\n'
        "    deps: [{tag: org/repo/nightly}, {workflow: org/repo/train}, {tag: local}]\n",
    )
    assert runtime == ["prep"]  # another repository's workflow cannot run in this run: its last done run
    assert tags == ["latest", "org/repo/v1", "org/repo/nightly", "local"]
    assert workflows == ["org/repo/prep", "org/repo/train"]
    assert expected == {"latest": "download", "org/repo/v1": "download"}


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('    depends-on: ["org/repo/:v1"]\n', r"workflows\.yaml:5:\d+: invalid reference 'org/repo/'"),
        ('    depends-on: ["download:org/v1"]\n', r"workflows\.yaml:5:\d+: invalid dependency"),
        ("    deps: [{tag: org//v1}]\n", r"workflows\.yaml:5:\d+: invalid reference 'org//v1'"),
        ("    deps: [{workflow: /train}]\n", r"workflows\.yaml:5:\d+: invalid reference '/train'"),
    ],
)
def test_bad_qualified_dependencies_are_errors_at_their_line(tmp_path: Path, lines: str, message: str) -> None:
    from dstack.cli.errors import WorkflowError

    with pytest.raises(WorkflowError, match=message):
        _deps(tmp_path, lines)


def _git(root: Path, *args: str) -> None:
    import subprocess

    subprocess.run(["git", "-c", "init.defaultBranch=main", *args], cwd=root, check=True, capture_output=True)


def test_the_current_repository_is_the_remote_else_the_folder(tmp_path: Path) -> None:
    from dstack.cli.repository import current_repository

    project = tmp_path / "my-app"
    (project / ".dstack").mkdir(parents=True)
    (project / ".dstack" / "workflows.yaml").write_text("workflows: []\n")
    (project / "src").mkdir()
    assert current_repository(project / "src") == "local/my-app"  # the project folder, not the subfolder
    _git(project, "init", "-q")
    assert current_repository(project / "src") == "local/my-app"  # git without a remote: still the folder
    _git(project, "remote", "add", "origin", "https://oauth2:glpat-SECRET@gitlab.com/Group/App.git")
    assert current_repository(project / "src") == "gitlab.com/group/app"
    assert current_repository(tmp_path) == f"local/{tmp_path.name}"  # no project here: this folder
