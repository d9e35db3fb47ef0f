from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dstack.cli.errors import WorkflowError
from dstack.cli.variables import check_run_args, env_name, load_variables, split_overrides, substitute
from dstack.cli.yamlsrc import load


def test_env_name_mapping() -> None:
    assert env_name("batch-size") == "BATCH_SIZE"
    assert env_name("lr") == "LR"
    assert env_name("a.b-c_d9") == "A_B_C_D9"


@given(st.text(min_size=1, max_size=30))
def test_env_name_is_always_a_valid_upper_case_name(name: str) -> None:
    out = env_name(name)
    assert len(out) == len(name.upper())
    assert all(c.isascii() and (c.isupper() or c.isdigit() or c == "_") for c in out)


def test_overrides_take_both_forms_and_pass_the_rest_on() -> None:
    overrides, rest = split_overrides(["--batch-size", "128", "--lr=0.1", "--other", "x", "pos"], {"batch-size", "lr"})
    assert overrides == {"batch-size": "128", "lr": "0.1"}
    assert rest == ["--other", "x", "pos"]
    with pytest.raises(WorkflowError, match="needs a value"):
        split_overrides(["--lr"], {"lr"})


def test_variables_global_then_workflow(tmp_path: Path) -> None:
    (tmp_path / ".dstack").mkdir()
    (tmp_path / ".dstack" / "variables.yaml").write_text(
        "variables:\n  global:\n    seed: 1\n    lr: 1.0\n  train:\n    lr: 0.10\n    batch-size: 64\n"
    )
    v = load_variables(tmp_path, "train")
    assert v.values == {"seed": "1", "lr": "0.10", "batch-size": "64"}  # as written: 0.10 stays 0.10
    assert v.env() == {"SEED": "1", "LR": "0.10", "BATCH_SIZE": "64"}
    assert load_variables(tmp_path, "other").values == {"seed": "1", "lr": "1.0"}


def test_substitution_types_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "w.yaml"
    p.write_text('a: ${{ n }}\nb: x-${{ n }}-y\nc: ["${{ missing }}"]\n')
    node = load(p)
    with pytest.raises(WorkflowError, match=r"w.yaml:3:5: \$\{\{ missing \}\} is not defined"):
        substitute(node, {"n": "2"}.get)
    node = load(p)
    substitute(node, {"n": "2", "missing": "m"}.get)
    assert node["a"] == 2 and node["b"] == "x-2-y" and node["c"] == ["m"]


@given(
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True),
        st.from_regex(r"[a-z0-9 ]{0,10}", fullmatch=True),
        max_size=5,
    )
)
def test_substitution_replaces_every_reference(values: dict[str, str]) -> None:
    import tempfile

    text = " ".join(f"<${{{{ {k} }}}}>" for k in values) or "plain"
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "w.yaml"
        p.write_text(f"s: '{text}'\n")
        node = load(p)
    substitute(node, values.get)
    assert node["s"] == (" ".join(f"<{v}>" for v in values.values()) or "plain")


def test_everything_after_the_separator_is_passed_on() -> None:
    overrides, rest = split_overrides(["--lr", "1", "--", "--lr", "2", "x"], {"lr"})
    assert overrides == {"lr": "1"} and rest == ["--lr", "2", "x"]


def test_run_args_checks() -> None:
    args = ["--batchsize", "3"]
    with pytest.raises(WorkflowError, match="did you mean --batch-size"):
        check_run_args(args, args, {"batch-size"}, "train", takes_args=True)
    check_run_args(["--lr", "3"], ["--lr", "3"], {"batch-size"}, "train", takes_args=True)  # for the script
    args = ["--", "--batchsize", "3"]
    check_run_args(args, ["--batchsize", "3"], {"batch-size"}, "train", takes_args=True)
    with pytest.raises(WorkflowError, match=r"takes no arguments.*its variables: --batch-size"):
        check_run_args(["x"], ["x"], {"batch-size"}, "hello", takes_args=False)
    check_run_args([], [], set(), "hello", takes_args=False)
