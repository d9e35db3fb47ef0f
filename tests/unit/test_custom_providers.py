"""Issue 13 items 9 and 10: 2022 custom providers (from a git repository or the project's own providers.yaml), and
the distributed provider refused as "not available yet"."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dstack.cli.commands.run import build_request
from dstack.cli.errors import WorkflowError
from dstack.cli.providers import custom
from tests.conftest import write_project

CORPUS = Path(__file__).resolve().parents[1] / "corpus2022"
PROVIDERS_YAML = """
providers:
  - name: hello
    image: python:3.11
    commands:
      - python3 main.py
"""


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    h = tmp_path / "home"
    monkeypatch.setenv("DSTACK_HOME", str(h))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))  # no user config leaks in
    custom._resolved.clear()
    yield h
    custom._resolved.clear()


def git_repo(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "provider"]):
        subprocess.run(["git", *args], cwd=path, check=True, env={**env, "PATH": "/usr/bin:/bin"})
    return path


def remote_workflow(url: str, name: str = "hello", extra: str = "") -> str:
    return f"""
    workflows:
      - name: w
        provider:
          name: {name}
          repo: {url}
        image: ubuntu
        commands: [echo hi]
        resources:
          nodes: 3
          cpu: 1
        {extra}
    """


def test_remote_provider_from_file_url_produces_its_job(tmp_path: Path) -> None:
    repo = git_repo(tmp_path / "prov", {".dstack/providers.yaml": PROVIDERS_YAML, "main.py": "print(1)\n"})
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    project = write_project(tmp_path / "p", remote_workflow(f"file://{repo}", extra="nodes: 2"))
    [job] = build_request(project, "w", []).submit.jobs
    assert job.provider == "hello" and job.image == "python:3.11"
    assert job.commands[-1] == "python3 main.py"
    assert any(commit in c for c in job.commands)  # the job runs exactly the commit the CLI read
    data = json.loads(job.env["DSTACK_WORKFLOW_DATA"])
    assert data["nodes"] == 2 and data["resources"]["nodes"] == 3 and data["commands"] == ["echo hi"]
    assert job.env["DSTACK_PROVIDER_COMMIT"] == commit


def test_remote_provider_from_relative_local_path(tmp_path: Path) -> None:
    git_repo(tmp_path / "prov", {".dstack/providers.yaml": PROVIDERS_YAML})
    project = write_project(tmp_path / "p", remote_workflow("../prov"))
    [job] = build_request(project, "w", []).submit.jobs
    assert job.env["DSTACK_PROVIDER_REPO"] == str((tmp_path / "prov").resolve())


def test_a_new_commit_is_fetched_on_the_next_run(tmp_path: Path) -> None:
    repo = git_repo(tmp_path / "prov", {".dstack/providers.yaml": PROVIDERS_YAML})
    project = write_project(tmp_path / "p", remote_workflow(f"file://{repo}"))
    build_request(project, "w", [])
    (repo / ".dstack/providers.yaml").write_text(PROVIDERS_YAML.replace("python3 main.py", "python3 v2.py"))
    subprocess.run(["git", "commit", "-qam", "v2"], cwd=repo, check=True, env={"PATH": "/usr/bin:/bin",
                   "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                   "GIT_COMMITTER_EMAIL": "t@t"})  # fmt: skip
    custom._resolved.clear()  # a new CLI process
    [job] = build_request(project, "w", []).submit.jobs
    assert job.commands[-1] == "python3 v2.py"


def test_unreachable_repository_is_a_clear_error_at_its_line(tmp_path: Path) -> None:
    project = write_project(tmp_path / "p", remote_workflow(f"file://{tmp_path}/nowhere"))
    with pytest.raises(WorkflowError, match="cannot fetch provider repository") as e:
        build_request(project, "w", [])
    assert e.value.location is not None and e.value.location.line == 6


def test_no_git_on_the_machine_is_an_error_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    project = write_project(tmp_path / "p", remote_workflow(f"file://{tmp_path}/r"))
    with pytest.raises(WorkflowError, match="needs git on this machine"):
        build_request(project, "w", [])


def test_unknown_name_in_the_repository_lists_what_it_defines(tmp_path: Path) -> None:
    repo = git_repo(tmp_path / "prov", {".dstack/providers.yaml": PROVIDERS_YAML})
    project = write_project(tmp_path / "p", remote_workflow(f"file://{repo}", name="bye"))
    with pytest.raises(WorkflowError, match="defines no provider 'bye'; it defines: hello"):
        build_request(project, "w", [])


def test_repository_without_providers_yaml(tmp_path: Path) -> None:
    repo = git_repo(tmp_path / "prov", {"README": "x"})
    project = write_project(tmp_path / "p", remote_workflow(f"file://{repo}"))
    with pytest.raises(WorkflowError, match=r"has no \.dstack/providers\.yaml"):
        build_request(project, "w", [])


def test_ext_transport_never_runs_a_command(tmp_path: Path) -> None:
    """Attack: `repo: ext::sh -c ...` makes git run a command on the CLI's machine; it must be refused."""
    marker = tmp_path / "pwned"
    project = write_project(tmp_path / "p", remote_workflow(f"'ext::sh -c touch% {marker}'"))
    with pytest.raises(WorkflowError, match="only file, git, http"):
        build_request(project, "w", [])
    assert not marker.exists()


def test_ext_transport_through_insteadof_is_still_refused(tmp_path: Path) -> None:
    """Attack: a URL rewritten by git config into `ext::` still goes through git's protocol allow-list."""
    marker = tmp_path / "pwned"
    (tmp_path / "gitconfig").write_text(f'[url "ext::sh -c touch% {marker}% "]\n\tinsteadOf = https://evil/\n')
    project = write_project(tmp_path / "p", remote_workflow("https://evil/x"))
    with pytest.raises(WorkflowError, match="cannot fetch provider repository"):
        build_request(project, "w", [])
    assert not marker.exists()


def test_option_like_url_is_refused(tmp_path: Path) -> None:
    """Attack: `repo: --upload-pack=...` would be an option to git clone."""
    project = write_project(tmp_path / "p", remote_workflow("'--upload-pack=touch /tmp/x'"))
    with pytest.raises(WorkflowError, match="is not a git URL"):
        build_request(project, "w", [])


def test_shell_characters_in_the_url_stay_one_argument(tmp_path: Path) -> None:
    """Attack: a repository path with `$(...)` must not run in the job's shell: it is quoted."""
    repo = git_repo(tmp_path / "a $(touch x) b", {".dstack/providers.yaml": PROVIDERS_YAML})
    project = write_project(tmp_path / "p", remote_workflow(f"'file://{repo}'"))
    [job] = build_request(project, "w", []).submit.jobs
    clone = next(c for c in job.commands if c.startswith("git clone"))
    assert "'file://" in clone and "$(touch x)" in clone.split("'")[1]


def test_the_cli_never_checks_out_or_runs_the_provider(tmp_path: Path, home: Path) -> None:
    """The cache is a bare repository: the provider's files (and any hooks it ships) are not written out."""
    marker = tmp_path / "ran"
    repo = git_repo(
        tmp_path / "prov",
        {".dstack/providers.yaml": PROVIDERS_YAML, "setup.py": f"open({str(marker)!r}, 'w')\n"},
    )
    project = write_project(tmp_path / "p", remote_workflow(f"file://{repo}"))
    build_request(project, "w", [])
    [cached] = (home / "cache" / "providers").iterdir()
    assert (cached / "HEAD").exists() and not (cached / "setup.py").exists() and not marker.exists()


def test_bare_name_from_the_projects_own_providers_yaml(tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: w
            provider: hello
            nodes: 2
        """,
        {".dstack/providers.yaml": PROVIDERS_YAML},
    )
    [job] = build_request(project, "w", []).submit.jobs
    assert job.provider == "hello" and job.image == "python:3.11" and job.commands[-1] == "python3 main.py"
    assert json.loads(job.env["DSTACK_WORKFLOW_DATA"])["nodes"] == 2


def test_broken_providers_yaml_names_what_is_missing(tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "p",
        "workflows:\n  - name: w\n    provider: hello\n",
        {".dstack/providers.yaml": "providers:\n  - name: hello\n    commands: [x]\n"},
    )
    with pytest.raises(WorkflowError, match="provider 'hello' has no 'image'"):
        build_request(project, "w", [])


@pytest.mark.parametrize("name", ["torchrun@experimental", "lab@main"])  # a 2022 provider's branch
def test_dev_and_distributed_providers_are_not_available_yet(tmp_path: Path, name: str) -> None:
    # With fields of their own (`nodes`, `version`): the provider is named, not a field.
    project = write_project(
        tmp_path / "p", f"workflows:\n  - name: w\n    provider: {name}\n    nodes: 2\n    version: 1\n"
    )
    with pytest.raises(WorkflowError, match=f":3:15: provider {name!r} is not available yet$") as e:
        build_request(project, "w", [])
    assert e.value.location is not None and e.value.location.line == 3


def test_own_providers_yaml_may_define_torchrun(tmp_path: Path) -> None:
    """ivan-bokov/dstack-test-providers defined its own `torchrun`: the project's definition wins."""
    project = write_project(
        tmp_path / "p",
        "workflows:\n  - name: w\n    provider: torchrun\n",
        {".dstack/providers.yaml": PROVIDERS_YAML.replace("hello", "torchrun")},
    )
    [job] = build_request(project, "w", []).submit.jobs
    assert job.provider == "torchrun"


# --- the 2022 corpus: every file REPORT.md lists as needing only item 9 or 10 -------------------------------------

sys.path.insert(0, str(CORPUS))
# tests/corpus2022/report.py: builds each file's scratch project the way REPORT.md was made.
report: Any = importlib.import_module("report")
ENTRIES = {e["file"][:3]: e for e in json.loads((CORPUS / "sources.json").read_text())}
ITEM9 = [f"{n:03d}" for n in [*range(47, 51), *range(52, 66), 68, 69, 70, 144]]
TORCHRUN_BRANCH = "provider 'torchrun@experimental' is not available yet"
NOT_YET = {"066": TORCHRUN_BRANCH, "067": TORCHRUN_BRANCH}  # 019 (code, lab, notebook): test_devenv_providers
GITHUB_REPO = "https://github.com/ivan-bokov/dstack-test-providers"


def _mirror(tmp_path: Path, entry: dict[str, object]) -> None:
    """ivan-bokov's workflows name their own repository by its GitHub URL: a local copy at the same commit's
    providers.yaml stands in for it (through git's `insteadOf`, as a user's mirror would), so no network."""
    companions = entry["companions"]
    assert isinstance(companions, dict)
    # 065 names `torchrun@kuku` at a commit whose main branch had no providers.yaml: the provider lived on that
    # branch; its content is not in the corpus, so the repository's own torchrun definition stands in for it.
    companion = companions.get(
        ".dstack/providers.yaml", "companions/ivan-bokov_dstack-test-providers_providers_279c3ae5.yaml"
    )
    text = (CORPUS / companion).read_text()
    repo = git_repo(tmp_path / "mirror", {".dstack/providers.yaml": text})
    # `name: torchrun@BRANCH`: the provider from that branch of the repository.
    for branch in re.findall(r"name: *[\w-]+@([\w-]+)", (CORPUS / str(entry["file"])).read_text()):
        subprocess.run(["git", "branch", branch], cwd=repo, check=True)
    (tmp_path / "gitconfig").write_text(f'[url "file://{repo}"]\n\tinsteadOf = {GITHUB_REPO}\n')


@pytest.mark.parametrize("number", ITEM9)
def test_corpus_item9_files_are_accepted(tmp_path: Path, number: str) -> None:
    entry = ENTRIES[number]
    if GITHUB_REPO in (CORPUS / entry["file"]).read_text():
        _mirror(tmp_path, entry)
    result = report.check_file(entry)
    assert result["file_error"] is None and not any(result["workflows"].values()), result


@pytest.mark.parametrize("number", sorted(NOT_YET))
def test_corpus_item10_files_are_refused_as_not_available_yet(number: str) -> None:
    result = report.check_file(ENTRIES[number])
    first = next(m for m in result["workflows"].values() if m)
    assert first.endswith(NOT_YET[number]), result


def test_corpus_051_is_still_refused_for_its_typo(tmp_path: Path) -> None:
    """A custom provider's own fields are open, but a misspelt common one (`resources.GPU`) is still caught."""
    _mirror(tmp_path, ENTRIES["051"])
    result = report.check_file(ENTRIES["051"])
    assert "unknown field 'GPU' in resources" in result["workflows"]["hello"]
