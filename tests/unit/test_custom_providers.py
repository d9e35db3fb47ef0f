"""Issue 13 items 9 and 10: 2022 custom providers (from a git repository or the project's own providers.yaml), and
the distributed provider refused as "not available yet"."""

from __future__ import annotations

import importlib
import io
import json
import re
import subprocess
import sys
import tarfile
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


def test_shell_characters_in_the_url_never_reach_the_job_shell(tmp_path: Path) -> None:
    """Attack: a repository path with `$(...)`: the job's commands name only the pinned commit's folder (hex), the
    URL never (the files come with the code; nothing in the job runs git)."""
    repo = git_repo(tmp_path / "a $(touch x) b", {".dstack/providers.yaml": PROVIDERS_YAML})
    project = write_project(tmp_path / "p", remote_workflow(f"'file://{repo}'"))
    [job] = build_request(project, "w", []).submit.jobs
    assert not any("$(touch x)" in c or "git " in c for c in job.commands), job.commands
    assert re.fullmatch(r'export DSTACK_PROVIDER_DIR="\$PWD/\.dstack-provider/[0-9a-f]{40}"', job.commands[1])


def test_the_provider_files_travel_with_the_code(tmp_path: Path) -> None:
    """Issue 13 follow-up: the pinned commit's tree (`git archive`: no .git, no untracked or later files) is packed
    under .dstack-provider/COMMIT/, so an agent that cannot reach the repository runs the provider."""
    from dstack.cli.commands.run import pack_code

    repo = git_repo(
        tmp_path / "prov",
        {".dstack/providers.yaml": PROVIDERS_YAML, "main.py": "print('v1')\n", "bin/run.sh": "echo run\n"},
    )
    (repo / "bin" / "run.sh").chmod(0o755)
    subprocess.run(["git", "-C", str(repo), "update-index", "--chmod=+x", "bin/run.sh"], check=True)
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], check=True
    )
    project = write_project(tmp_path / "p", remote_workflow(f"file://{repo}"))
    request = build_request(project, "w", [])
    [ref] = request.provider_repos
    (repo / "main.py").write_text("print('changed after the CLI read it')\n")  # not committed: not shipped
    (repo / "untracked.txt").write_text("x")
    packed = pack_code(project, request.provider_repos)
    prefix = f".dstack-provider/{ref.commit}/"
    with tarfile.open(fileobj=io.BytesIO(packed.data), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        shipped = {n.removeprefix(prefix) for n in members if n.startswith(prefix)}
        assert shipped == {".dstack/providers.yaml", "main.py", "bin/run.sh"}
        main_py = tar.extractfile(members[prefix + "main.py"])
        assert main_py is not None and main_py.read() == b"print('v1')\n"
        assert members[prefix + "bin/run.sh"].mode == 0o755 and members[prefix + "main.py"].mode == 0o644
        assert {m.mtime for m in members.values()} == {0}
    assert pack_code(project, request.provider_repos).ref.hash == packed.ref.hash  # reproducible


def test_the_provider_folder_is_found_from_the_working_dir(tmp_path: Path) -> None:
    repo = git_repo(tmp_path / "prov", {".dstack/providers.yaml": PROVIDERS_YAML})
    project = write_project(tmp_path / "p", remote_workflow(f"file://{repo}", extra="working_dir: src/app"))
    (project / "src" / "app").mkdir(parents=True)
    [job] = build_request(project, "w", []).submit.jobs
    assert job.commands[1].startswith('export DSTACK_PROVIDER_DIR="$PWD/../../.dstack-provider/')


def test_a_project_file_where_the_provider_goes_is_refused(tmp_path: Path) -> None:
    """The project cannot plant files in the provider's folder (a `main.py` that the provider would then run)."""
    from dstack.cli.commands.run import pack_code
    from dstack.cli.errors import CliError

    repo = git_repo(tmp_path / "prov", {".dstack/providers.yaml": PROVIDERS_YAML})
    project = write_project(tmp_path / "p", remote_workflow(f"file://{repo}"))
    request = build_request(project, "w", [])
    [ref] = request.provider_repos
    write_project(project, remote_workflow(f"file://{repo}"), {f".dstack-provider/{ref.commit}/main.py": "evil"})
    with pytest.raises(CliError, match="where dstack puts a provider's files"):
        pack_code(project, request.provider_repos)


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


def test_a_project_entry_named_like_a_built_in_is_shadowed_by_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """dstack's own July 2022 providers.yaml defined `python`, `bash`... by programs in its tree, and
    ivan-bokov/dstack-test-providers its own `torchrun`: a bare name means the built-in (2022's CLI: D 5822fc1
    `parse_run_args`), and the shadowed entry is named in a note at its line."""
    project = write_project(
        tmp_path / "p",
        "workflows:\n  - name: w\n    provider: bash\n    commands: [echo builtin]\n"
        "  - name: t\n    provider: torchrun\n    file: train.py\n",
        {
            ".dstack/providers.yaml": PROVIDERS_YAML.replace("hello", "bash")
            + "  - name: torchrun\n    image: python:3.9\n    commands: [python3 ddp.py]\n",
            "train.py": "",
        },
    )
    [job] = build_request(project, "w", []).submit.jobs
    assert job.commands == ["echo builtin"] and "DSTACK_WORKFLOW_DATA" not in job.env
    assert job.image != "python:3.11"
    [ddp] = build_request(project, "t", []).submit.jobs
    assert "python3 ddp.py" not in ddp.commands and any("torchrun" in c for c in ddp.commands)
    err = capsys.readouterr().err
    assert (
        f"note: {project}/.dstack/providers.yaml:3:11: the project's provider 'bash' is shadowed by the built-in" in err
    )
    assert f"`provider: bash` ({project}/.dstack/workflows.yaml:3:15) runs the built-in" in err
    assert "write `provider: {name: bash, repo: .}`" in err
    assert f"{project}/.dstack/providers.yaml:7:11: the project's provider 'torchrun' is shadowed" in err


def test_repo_dot_chooses_the_projects_entry_over_the_built_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = write_project(
        tmp_path / "p",
        "workflows:\n  - name: w\n    provider: {name: bash, repo: .}\n    commands: [echo data]\n",
        {".dstack/providers.yaml": PROVIDERS_YAML.replace("hello", "bash")},
    )
    [job] = build_request(project, "w", []).submit.jobs
    assert job.image == "python:3.11" and job.commands[-1] == "python3 main.py"
    assert json.loads(job.env["DSTACK_WORKFLOW_DATA"])["commands"] == ["echo data"]  # the workflow is the data
    assert "DSTACK_PROVIDER_REPO" not in job.env  # the project's own files: no repository fetched
    err = capsys.readouterr().err
    assert f"note: {project}/.dstack/workflows.yaml:3:34: provider 'bash' is the project's own entry" in err
    assert "chosen by `repo: .` over the built-in" in err


def test_repo_dot_without_such_an_entry_is_an_error_at_its_line(tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "p",
        "workflows:\n  - name: w\n    provider: {name: hello, repo: .}\n",
        {".dstack/providers.yaml": PROVIDERS_YAML.replace("hello", "other")},
    )
    with pytest.raises(
        WorkflowError, match=r":3:35: the project's .dstack/providers.yaml defines no provider 'hello';"
    ):
        build_request(project, "w", [])


def test_an_entry_no_built_in_has_needs_no_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = write_project(
        tmp_path / "p", "workflows:\n  - name: w\n    provider: hello\n", {".dstack/providers.yaml": PROVIDERS_YAML}
    )
    build_request(project, "w", [])
    assert "shadow" not in capsys.readouterr().err


# --- the 2022 corpus: every file REPORT.md lists as needing only item 9 or 10 -------------------------------------

sys.path.insert(0, str(CORPUS))
# tests/corpus2022/report.py: builds each file's scratch project the way REPORT.md was made.
report: Any = importlib.import_module("report")
ENTRIES = {e["file"][:3]: e for e in json.loads((CORPUS / "sources.json").read_text())}
# report.check_file reads ivan-bokov's repository from its real history (companions/*.bundle, at each file's commit),
# where 064's `torchrun@experimenta` (a typo of `experimental`) and 065's `torchrun@kuku` name branches the
# repository does not have: refused at their line (tests/unit/test_corpus2022.py lists them).
ITEM9 = [f"{n:03d}" for n in [*range(47, 51), *range(52, 64), 68, 69, 70, 144]]
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


def test_shipped_provider_files_unpack_and_an_escaping_link_is_refused(tmp_path: Path) -> None:
    """The agent unpacks the provider's files like the code's: its own links work; a link the provider's repository
    points outside the job folder (`/etc/passwd`, `../../../..`) makes the whole archive refused, nothing written."""
    from dstack.agent.unpack import UnpackError, extract
    from dstack.cli.commands.run import pack_code

    repo = git_repo(tmp_path / "prov", {".dstack/providers.yaml": PROVIDERS_YAML, "lib/x.py": "x = 1\n"})
    (repo / "near").symlink_to("lib/x.py")
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "l"], check=True
    )
    project = write_project(tmp_path / "p", remote_workflow(f"file://{repo}"))
    request = build_request(project, "w", [])
    [ref] = request.provider_repos
    archive = tmp_path / "code.tar.gz"
    archive.write_bytes(pack_code(project, request.provider_repos).data)
    extract(archive, tmp_path / "job")
    assert (tmp_path / "job" / ref.folder / "near").read_text() == "x = 1\n"
    assert (tmp_path / "job" / ".dstack" / "workflows.yaml").exists()

    for target in ("/etc/passwd", "../../../../etc/passwd"):
        evil = git_repo(tmp_path / f"evil{len(target)}", {".dstack/providers.yaml": PROVIDERS_YAML})
        (evil / "leak").symlink_to(target)
        subprocess.run(["git", "-C", str(evil), "add", "-A"], check=True)
        subprocess.run(
            ["git", "-C", str(evil), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "l"], check=True
        )
        custom._resolved.clear()
        project = write_project(tmp_path / f"q{len(target)}", remote_workflow(f"file://{evil}"))
        request = build_request(project, "w", [])
        archive.write_bytes(pack_code(project, request.provider_repos).data)
        job = tmp_path / f"job{len(target)}"
        with pytest.raises(UnpackError, match="points outside the job folder"):
            extract(archive, job)


def test_the_sdk_ships_the_provider_files_too(tmp_path: Path) -> None:
    """dstack.api packs once per tree state: the provider's pinned commit is part of that state, so a new commit of
    the provider repository is packed again, and its files travel as with `dstack run`."""
    from dstack.api.code import CodeCache

    repo = git_repo(tmp_path / "prov", {".dstack/providers.yaml": PROVIDERS_YAML, "main.py": "v1\n"})
    project = write_project(tmp_path / "p", remote_workflow(f"file://{repo}"))
    cache = CodeCache()
    [first] = build_request(project, "w", []).provider_repos
    packed = cache.pack(project, [first])
    assert f"{first.folder}/main.py" in packed.names
    assert cache.pack(project, [first]) is packed  # unchanged: packed once
    (repo / "main.py").write_text("v2\n")
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "2"], check=True
    )
    custom._resolved.clear()  # a new CLI process: the repository is fetched again
    [second] = build_request(project, "w", []).provider_repos
    assert second.commit != first.commit
    again = cache.pack(project, [second])
    assert again is not packed and f"{second.folder}/main.py" in again.names
    assert cache.pack(project) is not again  # without providers: the project's files only
