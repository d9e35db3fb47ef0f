"""The 2022 spellings of workflow fields (issue 13 items 1, 2, 5 and 7), each with its 2022 meaning."""

from __future__ import annotations

from pathlib import Path

import pytest

from dstack.cli.errors import WorkflowError
from dstack.cli.providers import load_provider
from dstack.cli.spec import Workflow
from dstack.cli.workflows import load_workflows
from dstack.protos.v1 import common_pb2


def load(tmp_path: Path, text: str) -> dict[str, Workflow]:
    (tmp_path / ".dstack").mkdir(exist_ok=True)
    (tmp_path / ".dstack" / "workflows.yaml").write_text(text)
    return load_workflows(tmp_path)


BASH = "workflows:\n  - name: w\n    provider: bash\n    commands: [x]\n"


def spec(tmp_path: Path, body: str) -> common_pb2.JobSpec:
    wf = load(tmp_path, "workflows:\n  - name: w\n" + body)["w"]
    return load_provider(wf.provider).job_specs(wf)[0]


# Item 1: python provider


@pytest.mark.parametrize("key", ["file", "script", "python_script"])
def test_python_script_names_of_every_year(tmp_path: Path, key: str) -> None:
    s = spec(tmp_path, f"    provider: python\n    {key}: train.py\n")
    assert s.commands[-1] == "exec $PYTHON train.py"


def test_python_script_carries_arguments_as_in_april_2022(tmp_path: Path) -> None:
    s = spec(tmp_path, "    provider: python\n    python_script: train.py --epochs 3 --name 'a b'\n    args: [--x]\n")
    assert s.commands[-1] == "exec $PYTHON train.py --epochs 3 --name 'a b' --x"


@pytest.mark.parametrize(
    "body, line, message",
    [
        ("    file: a.py\n    script: b.py\n", 5, "'file' and 'script' both name the script"),
        ("    python_script: '  '\n", 4, "python_script is empty"),
        ('    python_script: "a.py \'unclosed"\n', 4, "No closing quotation"),
        ("    python_script: ../outside.py\n", 4, "must be relative"),
        ("    script: /etc/passwd\n", 4, "must be relative"),
        ("    version: 3.10\n", 2, "missing required field 'file'"),
        ("    script: a.py\n    python: ['3.9']\n", 5, "python must look like 3.11"),
        ("    script: a.py\n    python: {default: 3.9}\n", 5, "python must look like 3.11"),
    ],
)
def test_python_script_mistakes_are_refused_at_their_line(tmp_path: Path, body: str, line: int, message: str) -> None:
    with pytest.raises(WorkflowError, match=rf"workflows.yaml:{line}:\d+: .*{message}"):
        load(tmp_path, "workflows:\n  - name: w\n    provider: python\n" + body)


@pytest.mark.parametrize("key", ["python", "version"])
@pytest.mark.parametrize("written, meant", [("3.10", "3.10"), ("3.1", "3.10"), ("'3.9'", "3.9"), ("3", "3")])
def test_python_version_as_2022_read_it(tmp_path: Path, key: str, written: str, meant: str) -> None:
    s = spec(tmp_path, f"    provider: python\n    script: a.py\n    {key}: {written}\n")
    assert s.python_version == meant and f"python{meant}" in s.commands[0]


def test_quoted_3_1_stays_3_1(tmp_path: Path) -> None:
    """2022 turned only the number 3.1 (an unquoted `3.10`) into 3.10; a string is used as written."""
    assert spec(tmp_path, "    provider: python\n    file: a.py\n    python: '3.1'\n").python_version == "3.1"


def test_python_requirements_and_environment(tmp_path: Path) -> None:
    s = spec(
        tmp_path,
        "    provider: python\n    python_script: a.py\n    requirements: req.txt\n    environment:\n      K: v\n",
    )
    assert dict(s.env) == {"K": "v"}
    assert any("-r req.txt" in c for c in s.commands)


# Item 2: bash `python:` and `requirements:`


def test_bash_python_and_requirements_run_in_a_venv_before_the_commands(tmp_path: Path) -> None:
    s = spec(tmp_path, "    provider: bash\n    python: 3.10\n    requirements: req.txt\n    commands: [python x.py]\n")
    assert s.python_version == "3.10"
    cmds = list(s.commands)
    assert "python3.10" in cmds[0] and "exit 127" in cmds[0]
    assert "python3.10 -m venv --system-site-packages .dstack-venv && python3.10 -c " in cmds[1]
    assert " .dstack-venv && . .dstack-venv/bin/activate;" in cmds[1]  # seeing what python3.10's venv has
    assert 'ln -sf "$(command -v python3.10)" .dstack-bin/python' in cmds[1]  # no venv module: python is 3.10
    assert cmds[-2] == "python -m pip install --disable-pip-version-check -r req.txt"
    assert cmds[-1] == "python x.py"


def test_bash_python_alone_makes_a_venv_with_its_own_pip(tmp_path: Path) -> None:
    s = spec(tmp_path, "    provider: bash\n    python: '3.9'\n    commands: [python -V]\n")
    cmds = list(s.commands)
    assert len(cmds) == 3 and "python3.9 -m venv --system-site-packages .dstack-venv" in cmds[1]
    assert cmds[2] == "python -V"


def test_bash_requirements_alone_use_python3(tmp_path: Path) -> None:
    s = spec(tmp_path, "    provider: bash\n    requirements: r.txt\n    commands: [x]\n")
    assert s.python_version == "" and "python3 -m venv" in list(s.commands)[1]


def test_bash_without_them_is_unchanged(tmp_path: Path) -> None:
    assert list(spec(tmp_path, "    provider: bash\n    commands: [a, b]\n").commands) == ["a", "b"]


@pytest.mark.parametrize(
    "body, line, message",
    [
        ("    python: 2.7\n", 4, "python must look like 3.11"),
        ("    python: [3.9]\n", 4, "python must look like 3.11"),
        ("    requirements: ../../etc/passwd\n", 4, "must be relative"),
        ("    requirements: [a.txt]\n", 4, "must be a string"),
        ("    pyhton: 3.10\n", 4, "did you mean 'python'"),
    ],
)
def test_bash_mistakes_are_refused_at_their_line(tmp_path: Path, body: str, line: int, message: str) -> None:
    with pytest.raises(WorkflowError, match=rf"workflows.yaml:{line}:\d+: .*{message}"):
        load(tmp_path, "workflows:\n  - name: w\n    provider: bash\n" + body + "    commands: [x]\n")


def test_shell_metacharacters_in_requirements_are_quoted(tmp_path: Path) -> None:
    s = spec(tmp_path, "    provider: bash\n    requirements: 'r.txt; touch pwned'\n    commands: [x]\n")
    assert "-r 'r.txt; touch pwned'" in "\n".join(s.commands)


# Item 5: a bare env NAME


def test_bare_env_name_takes_the_callers_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSTACK_TEST_SET", "from-caller")
    assert load(
        tmp_path, "workflows:\n  - name: w\n    provider: bash\n    commands: [x]\n    env: [DSTACK_TEST_SET]\n"
    )["w"].env == {"DSTACK_TEST_SET": "from-caller"}


def test_bare_env_name_unset_is_empty_with_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DSTACK_TEST_UNSET", raising=False)
    wfs = load(
        tmp_path,
        "workflows:\n  - name: w\n    provider: bash\n    commands: [x]\n    env:\n      - DSTACK_TEST_UNSET\n",
    )
    assert wfs["w"].env == {"DSTACK_TEST_UNSET": ""}
    err = capsys.readouterr().err
    assert "note:" in err and "workflows.yaml:6:" in err and "DSTACK_TEST_UNSET" in err and "empty" in err


def test_bad_env_name_is_still_an_error(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match=r"workflows.yaml:5:\d+: invalid environment variable name"):
        load(tmp_path, "workflows:\n  - name: w\n    provider: bash\n    commands: [x]\n    env: ['1BAD']\n")


# Item 7: sizes


@pytest.mark.parametrize(
    "written, size",
    [
        ("64GB", 64 * 10**9),
        ("64G", 64 * 10**9),
        ("8gb", 8 * 10**9),
        ("512MB", 512 * 10**6),
        ("512M", 512 * 10**6),
        ("1.5GiB", 3 << 29),
        ("1.5Gi", 3 << 29),
        ("512MiB", 512 << 20),
        ("512Mi", 512 << 20),
        ("1TB", 10**12),
        ("1TiB", 1 << 40),
        ("100", 100),
        ("'100 KB'", 100_000),
    ],
)
def test_sizes_decimal_and_binary(tmp_path: Path, written: str, size: int) -> None:
    wf = load(
        tmp_path,
        f"workflows:\n  - name: w\n    provider: bash\n    commands: [x]\n    resources:\n"
        f"      memory: {written}\n      shm_size: {written}\n",
    )["w"]
    assert wf.resources.memory_bytes == size and wf.resources.shm_size_bytes == size


@pytest.mark.parametrize("written", ["64XB", "i", "GiGB", "-1GB", "lots"])
def test_bad_sizes_are_refused_at_their_line(tmp_path: Path, written: str) -> None:
    with pytest.raises(WorkflowError, match=r"workflows.yaml:6:\d+: field 'memory'"):
        load(
            tmp_path,
            BASH + f"    resources:\n      memory: {written}\n",
        )
