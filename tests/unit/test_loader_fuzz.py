"""Fuzzing the workflow loader: whatever the file holds, the only failure is a documented error."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dstack.cli.errors import CliError
from dstack.cli.workflows import load_workflow_nodes, parse_workflow

FIELDS = [
    "name",
    "provider",
    "commands",
    "file",
    "args",
    "resources",
    "gpu",
    "memory",
    "artifacts",
    "env",
    "environment",
    "depends-on",
    "deps",
    "working_dir",
    "version",
    "path",
    "mount",
    "count",
    "help",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["bash", "python", "../x", "/abs", "64GB", "10XB", "${{ x }}", "a:b", "2024-13-45", "1e999"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS), inner, max_size=5)),
    max_leaves=12,
)
documents = st.one_of(
    st.builds(
        lambda wfs: {"workflows": wfs},
        st.lists(st.dictionaries(st.sampled_from(FIELDS), values, max_size=7), max_size=3),
    ),
    values,
)


def check(tmp: Path, text: str) -> None:
    (tmp / ".dstack").mkdir(exist_ok=True)
    (tmp / ".dstack" / "workflows.yaml").write_text(text)
    try:
        for node in load_workflow_nodes(tmp).values():
            parse_workflow(node)
    except CliError:
        pass  # a documented error, with a message; anything else fails the test


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(documents)
def test_structured_documents(tmp_path: Path, doc: object) -> None:
    check(tmp_path, yaml.safe_dump(doc, allow_unicode=True))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.sampled_from(list("workflows:- name[]{}'\"\n\t #&*!|>%@`,.\\u00e9\x00")), max_size=80))
def test_arbitrary_text(tmp_path: Path, text: str) -> None:
    check(tmp_path, text)
