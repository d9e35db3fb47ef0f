"""Issue 13 items 6 and 8: every 2022 spelling of dependencies, and the early-2022 syntax (no provider,
`template:`), each accepted with its 2022 meaning or refused at its own line (tests/corpus2022/MEANINGS.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from dstack.cli.commands.run import CodeFile, Request, build_request, check_code_files, located
from dstack.cli.dependencies import Dependencies
from dstack.cli.errors import Location, NotFoundError, WorkflowError
from dstack.cli.packing import pack
from dstack.cli.term import Term
from dstack.cli.workflows import dependencies, load_workflow_nodes, load_workflows
from dstack.protos.v1 import client_pb2

HEAD = (
    "workflows:\n  - name: prep\n    provider: bash\n    commands: [x]\n"
    "  - name: t\n    provider: bash\n    commands: [x]\n"
)


def project(tmp_path: Path, workflows: str, variables: str = "") -> Path:
    (tmp_path / ".dstack").mkdir(exist_ok=True)
    (tmp_path / ".dstack" / "workflows.yaml").write_text(workflows)
    if variables:
        (tmp_path / ".dstack" / "variables.yaml").write_text(variables)
    return tmp_path


def deps_of(tmp_path: Path, lines: str) -> Dependencies:
    return dependencies(load_workflow_nodes(project(tmp_path, HEAD + lines))["t"])


# ---- item 6: deps and depends-on ---------------------------------------------------------------------


def test_deps_strings_of_autumn_2022(tmp_path: Path) -> None:
    """`_parse_dep_spec`: `:TAG` is a tag, a bare NAME a workflow's last done run; `NAME:TAG` as in depends-on."""
    d = deps_of(tmp_path, '    deps:\n      - prep\n      - ":mnist_data"\n      - "prep:latest"\n')
    assert d.workflows == ["prep"] and d.runtime == []  # deps never runs a workflow: it takes a finished run's files
    assert d.tags == ["mnist_data", "latest"]
    assert d.tag_workflows == {"latest": "prep"}  # the tag must be on a run of prep (checked against the coordinator)
    lines = [d.at(k, n, Location(Path("x"), 0, 0)).line for k, n in [("workflow", "prep"), ("tag", "mnist_data")]]
    assert lines == [9, 10]


def test_deps_mappings_with_mount(tmp_path: Path) -> None:
    d = deps_of(tmp_path, "    deps:\n      - {tag: t1, mount: true}\n      - workflow: prep\n        mount: false\n")
    assert d.tags == ["t1"] and d.workflows == ["prep"]


def test_other_repositories_in_every_spelling(tmp_path: Path) -> None:
    d = deps_of(
        tmp_path,
        "    deps:\n"
        "      - org/repo/train\n"  # its last done run (2022: OWNER/REPO/NAME)
        "      - :org/repo/nightly\n"  # 2022's spelling of another repository's tag
        "      - org/repo/prep:v1\n"  # the run of org/repo's prep tagged v1
        "      - {tag: org/repo/t2}\n"
        "      - {workflow: org/repo/w2, mount: true}\n"
        '    depends-on: ["org/repo/other"]\n',  # another repository's workflow cannot run here: its last done run
    )
    assert d.workflows == ["org/repo/other", "org/repo/train", "org/repo/w2"]
    assert d.tags == ["org/repo/nightly", "org/repo/v1", "org/repo/t2"]
    assert d.tag_workflows == {"org/repo/v1": "prep"}
    assert d.runtime == []


def test_depends_on_list_of_april_2022(tmp_path: Path) -> None:
    d = deps_of(tmp_path, '    depends-on: [prep, "prep:latest", ":nightly"]\n')
    assert d.runtime == ["prep"] and d.tags == ["latest", "nightly"] and d.tag_workflows == {"latest": "prep"}


def test_depends_on_object_of_the_april_2022_schema(tmp_path: Path) -> None:
    """dstackai/gpt-2 (corpus 027-029): `workflows` are what the list holds; `repo.include` names project files."""
    d = deps_of(
        tmp_path,
        "    depends-on:\n      repo:\n        include:\n          - requirements.txt\n          - ./src/encoder.py\n"
        "      workflows:\n        - prep\n",
    )
    assert d.runtime == ["prep"]
    assert [(p, loc.line) for p, loc in d.include] == [("requirements.txt", 11), ("src/encoder.py", 12)]
    assert deps_of(tmp_path, "    depends-on:\n      repo:\n        include: [a.py]\n").runtime == []


def test_a_dependency_named_twice_is_one(tmp_path: Path) -> None:
    d = deps_of(tmp_path, "    depends-on: [prep, prep]\n    deps: [{tag: t}, ':t']\n")
    assert d.runtime == ["prep"] and d.tags == ["t"]


@pytest.mark.parametrize(
    ("lines", "line", "message"),
    [
        ("    deps:\n      - :nightly\n      - download:v1:v2\n", 10, "invalid dependency 'download:v1:v2'"),
        ("    deps:\n      - ':'\n", 9, "invalid dependency ':'"),
        ("    deps:\n      - ''\n", 9, "invalid dependency ''"),
        ("    deps:\n      - ' prep'\n", 9, "invalid dependency ' prep'"),
        ("    deps:\n      - prep:\n", 9, r"each item of 'deps' must be \{tag: TAG\}"),  # `prep:` is a mapping
        ("    deps:\n      - 'prep:'\n", 9, "invalid dependency 'prep:'"),
        ("    deps:\n      - 'prep:org/v1'\n", 9, "invalid dependency"),
        ("    deps:\n      - org//x\n", 9, "invalid reference 'org//x'"),
        ("    deps:\n      - org/repo/:v1\n", 9, "a tag of another repository is written :org/repo/v1"),
        ("    deps:\n      - download-data: v1\n", 9, r"write `- download-data:v1` \(no space after ':'\)"),
        ("    deps:\n      - {tag: a, workflow: b}\n", 9, "each item of 'deps' must be"),
        ("    deps:\n      - {tag: a, mount: 'true'}\n", 9, "'mount' must be true or false"),
        ("    deps:\n      - {tag: a, mount: 1}\n", 9, "'mount' must be true or false"),
        ("    deps:\n      - {workflow: 'a:b'}\n", 9, "':' is not part of a workflow name"),
        ("    deps:\n      - {tag: ''}\n", 9, "'tag' is empty"),
        ("    deps:\n      - [a]\n", 9, "each item of 'deps' must be"),
        ("    deps:\n      - true\n", 9, "each item of 'deps' must be"),
        ("    deps: prep\n", 8, "'deps' must be a list"),
        ("    depends-on:\n      - prep\n      - 'prep:'\n", 10, "invalid dependency 'prep:'"),
        ("    depends-on: {workflow: [prep]}\n", 8, "unknown field 'workflow' in depends-on; did you mean 'workflows'"),
        ("    depends-on:\n      repo: [a.py]\n", 9, "'repo' must be a mapping like"),
        ("    depends-on:\n      repo:\n        exclude: [a]\n", 10, "unknown field 'exclude' in depends-on.repo"),
        ("    depends-on:\n      repo:\n        include: a.py\n", 10, "field 'include' must be a list of strings"),
        ("    depends-on:\n      repo:\n        include:\n          - /etc/passwd\n", 11, "must be a path inside"),
        ("    depends-on:\n      repo:\n        include:\n          - a/../../x\n", 11, "must be a path inside"),
        ("    depends-on:\n      repo:\n        include: ['  ']\n", 10, "must be a path inside"),
        ("    depends-on:\n      workflows:\n        - {a: b}\n", 10, "item 1 of 'workflows' must be a string"),
    ],
)
def test_dependency_mistakes_are_refused_at_their_line(tmp_path: Path, lines: str, line: int, message: str) -> None:
    with pytest.raises(WorkflowError, match=rf"workflows\.yaml:{line}:\d+: .*{message}"):
        deps_of(tmp_path, lines)


def test_variables_cannot_shape_the_run_in_the_object_form(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match=r"workflows\.yaml:9:\d+: 'depends-on' cannot use \$\{\{ \}\}"):
        deps_of(tmp_path, "    depends-on:\n      workflows: ['${{ which }}']\n")


def test_an_unknown_runtime_dependency_is_refused_at_its_item(tmp_path: Path) -> None:
    root = project(tmp_path, HEAD + "    depends-on:\n      workflows:\n        - prep\n        - prepp\n")
    with pytest.raises(WorkflowError, match=r"workflows\.yaml:11:\d+: depends-on names 'prepp'"):
        build_request(root, "t", [])


def test_tag_checks_and_workflow_refs_point_at_their_items(tmp_path: Path) -> None:
    root = project(tmp_path, HEAD + "    deps:\n      - prep\n      - ':nightly'\n      - org/repo/prep:v1\n")
    r = build_request(root, "t", [])
    assert [(t, w, loc.line) for t, w, loc in r.tag_checks] == [("nightly", "", 10), ("org/repo/v1", "prep", 11)]
    assert [(w, loc.line) for w, loc in r.workflow_refs] == [("prep", 9)]
    assert list(r.submit.jobs[0].input_workflows) == ["prep"] and len(r.submit.jobs) == 1  # nothing runs first


def test_a_refused_submission_about_a_workflow_dependency_is_shown_at_its_line(tmp_path: Path) -> None:
    loc = Location(tmp_path / "w.yaml", 9, 9)
    request = Request(client_pb2.SubmitRunRequest(), [], [], [("prep", loc), ("org/repo/train", loc)])
    no_run = NotFoundError("no run of workflow 'prep' has finished done in repository r yet: run it first")
    assert str(located(no_run, request)).startswith(f"{tmp_path}/w.yaml:9:9: no run of workflow 'prep'")
    ghost = NotFoundError("no repository 'org/repo' has runs on this coordinator")
    assert isinstance(located(ghost, request), WorkflowError)
    here, there = Location(tmp_path / "w.yaml", 3, 1), Location(tmp_path / "w.yaml", 4, 1)
    same_name = Request(client_pb2.SubmitRunRequest(), [], [], [("org/repo/prep", there), ("prep", here)])
    mine = NotFoundError("no run of workflow 'prep' has finished done in repository local/u/a yet: run it first")
    assert getattr(located(mine, same_name), "location", None) == here
    theirs = NotFoundError("no run of workflow 'prep' has finished done in repository github.com/org/repo yet")
    assert getattr(located(theirs, same_name), "location", None) == there
    other = NotFoundError("something else")
    assert located(other, request) is other


def test_included_files_must_be_in_the_code_sent(tmp_path: Path) -> None:
    root = project(
        tmp_path,
        "workflows:\n  - name: t\n    image: python:3.9\n    commands: [x]\n"
        "    depends-on:\n      repo:\n        include: [src, main.py, missing.py]\n",
    )
    (root / "src").mkdir()
    (root / "src" / "enc.py").write_text("")
    (root / "main.py").write_text("")
    r = build_request(root, "t", [])
    assert [(f.path, f.may_be_folder) for f in r.code_files] == [("src", True), ("main.py", True), ("missing.py", True)]
    with pytest.raises(
        WorkflowError, match=r"workflows\.yaml:7:\d+: depends-on.repo.include 'missing.py': there is no"
    ):
        check_code_files(r, pack(root), root, Term(stderr=True))
    r.code_files = [CodeFile("src", "x", r.code_files[0].location, False, may_be_folder=False)]
    with pytest.raises(WorkflowError):  # a folder is only fine where the field may name one
        check_code_files(r, pack(root), root, Term(stderr=True))


# ---- item 8: the early-2022 syntax -------------------------------------------------------------------

EARLY = """workflows:
  - name: download-model
    image: tensorflow/tensorflow:1.15.0-py3
    commands:
      - python3 download_model.py $model
    artifacts:
      - models
  - name: finetune-model
    template:
      image: python:3.9
      commands:
        - train.py --run_name $run_name --job $job_id --model_name ${model} --dir $models_dir $variables_as_args
        - echo \\$model '$model' $modelx $model.txt
      resources:
        gpu: 1
    depends-on:
      - download-model
"""
VARIABLES = """variables:
  global:
    model: 124M
    models_dir: model
  finetune-model:
    batch-size: 1
    learning_rate: 0.00002
    prompt: a b
"""


def test_early_syntax_runs_as_the_docker_provider(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wfs = load_workflows(project(tmp_path, EARLY))
    assert {w.provider for w in wfs.values()} == {"docker"}
    assert wfs["finetune-model"].image == "python:3.9" and wfs["finetune-model"].resources.gpu.count == 1
    assert wfs["finetune-model"].depends_on == ["download-model"]
    err = capsys.readouterr().err
    assert "workflows.yaml:2:5: workflow 'download-model' uses the early-2022 syntax (image and commands)" in err
    assert "write `provider: docker`" in err
    assert "workflows.yaml:9:5: workflow 'finetune-model' uses the early-2022 syntax ('template:'" in err


def test_early_system_variables_in_commands(tmp_path: Path) -> None:
    r = build_request(project(tmp_path, EARLY, VARIABLES), "finetune-model", ["--learning_rate", "0.1"])
    download, finetune = r.submit.jobs
    assert download.commands[-1] == "python3 download_model.py 124M"
    assert finetune.commands[-2] == (
        "train.py --run_name ${{ run.name }} --job ${JOB_ID} --model_name 124M --dir model"
        " --batch-size 1 --learning_rate 0.1 --prompt 'a b'"  # the workflow's own variables, not the global ones
    )
    assert finetune.commands[-1] == "echo \\$model '124M' $modelx 124M.txt"  # as 2022's textual replacement
    assert finetune.env["MODEL"] == "124M" and finetune.env["LEARNING_RATE"] == "0.1"  # env vars, upper case


def test_variables_as_args_keeps_each_value_one_word_whatever_it_holds(tmp_path: Path) -> None:
    """A value with shell syntax (`--note '$(touch pwned); x'` on the command line) is one argument, never code."""
    root = project(tmp_path, EARLY, VARIABLES.replace("prompt: a b", "note: ok"))
    r = build_request(root, "finetune-model", ["--note", "$(touch pwned); `id` $model"])
    assert r.submit.jobs[-1].commands[-2].endswith("--note '$(touch pwned); `id` $model'")


def test_system_variables_are_only_for_the_early_syntax(tmp_path: Path) -> None:
    root = project(tmp_path, "workflows:\n  - name: w\n    provider: bash\n    commands: [echo $model $run_name]\n")
    (root / ".dstack" / "variables.yaml").write_text(VARIABLES)
    assert list(build_request(root, "w", []).submit.jobs[0].commands) == ["echo $model $run_name"]


def test_template_holding_a_provider_is_hoisted_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = "workflows:\n  - name: w\n    template:\n      provider: bash\n      commands: [x]\n"
    wf = load_workflows(project(tmp_path, text))
    assert wf["w"].provider == "bash" and wf["w"].node["commands"] == ["x"]
    assert "workflows.yaml:3:5: workflow 'w' nests its fields under 'template:'" in capsys.readouterr().err


def test_template_beside_a_provider_is_that_providers_own(tmp_path: Path) -> None:
    """February 2022 custom providers read their fields under `template`: left as written for them; a built-in
    provider has no such field."""
    text = "workflows:\n  - name: w\n    provider: bash\n    template:\n      commands: [x]\n"
    with pytest.raises(WorkflowError, match=r"workflows\.yaml:4:\d+: unknown field 'template' in workflow 'w'"):
        load_workflows(project(tmp_path, text))


@pytest.mark.parametrize(
    ("workflow", "line", "message"),
    [
        ("  - name: a\n    commands: [x]\n", 2, "which needs 'image' too; today write `provider: bash`"),
        ("  - name: a\n", 2, "missing required field 'provider'"),
        ("  - name: a\n    template: x\n", 3, "'template' must be a mapping"),
        (
            "  - name: a\n    image: a\n    template:\n      image: b\n",
            5,
            r"'image' is both under 'template' and beside",
        ),
        ("  - name: a\n    template:\n      image: python\n      comands: [x]\n", 5, "unknown field 'comands'"),
        ("  - name: a\n    image: 'Not An Image'\n    commands: [x]\n", 3, "image"),
        ("  - name: a\n    image: python\n    commands: x\n", 4, "field 'commands' must be a list of strings"),
    ],
)
def test_early_syntax_mistakes_are_refused_at_their_line(
    tmp_path: Path, workflow: str, line: int, message: str
) -> None:
    with pytest.raises(WorkflowError, match=rf"workflows\.yaml:{line}:\d+: .*{message}"):
        build_request(project(tmp_path, "workflows:\n" + workflow), "a", [])


# ---- the real 2022 corpus ----------------------------------------------------------------------------


def _report() -> Any:
    spec = importlib.util.spec_from_file_location("corpus2022_report_deps", CORPUS / "report.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CORPUS = Path(__file__).resolve().parents[1] / "corpus2022"
REPORT = _report()
ENTRIES = json.loads((CORPUS / "sources.json").read_text())
# Files that use a dependency form or the early syntax, and otherwise only forms issue 13 items 1, 2, 5, 7 cover.
USING_6_OR_8 = [
    e
    for e in ENTRIES
    if {"6", "8"} & (items := {i for i, _ in REPORT.forms(e)}) and items <= {"1", "2", "5", "6", "7", "8"}
]


def test_the_corpus_files_with_these_forms_are_the_known_ten() -> None:
    assert sorted(e["file"][:3] for e in USING_6_OR_8) == [
        "001",
        "002",
        "003",
        "004",
        "009",
        "010",
        "027",
        "028",
        "029",
        "159",
    ]


@pytest.mark.parametrize("entry", USING_6_OR_8, ids=[e["file"][:3] for e in USING_6_OR_8])
def test_corpus_files_with_2022_dependencies_or_the_early_syntax_are_accepted(entry: dict[str, Any]) -> None:
    result = REPORT.check_file(entry)
    assert result["file_error"] is None
    assert not any(result["workflows"].values()), result["workflows"]
