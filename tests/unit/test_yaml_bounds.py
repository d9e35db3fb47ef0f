"""The workflow loader refuses hostile YAML (alias bombs, deep nesting, huge documents) at a line, and
returns instead of hanging: each load runs under a 30 s limit, far above its real cost (bench/yaml_bounds.py
prints the timings)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from pathlib import Path

import pytest

from dstack.cli import yamlsrc
from dstack.cli.errors import WorkflowError

HANG_S = 30.0


def laughs(levels: int) -> str:
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


HOSTILE: dict[str, tuple[Callable[[], str], str]] = {
    # 10**20 values once expanded, from a file of a few kilobytes
    "billion_laughs": (lambda: laughs(20), "the YAML holds more than 100000 values"),
    "deep_flow": (lambda: "x: " + "[" * 200_000 + "]" * 200_000, "the YAML nests deeper than 64 levels"),
    "deep_block": (lambda: "".join("  " * i + f"k{i}:\n" for i in range(500)), "the YAML nests deeper than 64 levels"),
    "deep_mapping_flow": (lambda: "x: " + "{a: " * 5000 + "1" + "}" * 5000, "the YAML nests deeper than 64 levels"),
    "too_wide": (lambda: "x: [" + "1," * 120_000 + "]\n", "the YAML holds more than 100000"),
    "too_big": (lambda: "x: '" + "a" * (yamlsrc.MAX_DOCUMENT_BYTES + 10) + "'\n", "a workflow file may be at most"),
}


def load_within(path: Path) -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(yamlsrc.load, path).result(timeout=HANG_S)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_yaml_fails_with_a_located_error(case: str, tmp_path: Path) -> None:
    make, message = HOSTILE[case]
    path = tmp_path / "workflows.yaml"
    path.write_text(make())
    with pytest.raises(WorkflowError) as e:
        load_within(path)
    assert message in str(e.value)
    assert e.value.location is not None and e.value.location.file == path


def test_shared_anchors_within_the_bound_still_load(tmp_path: Path) -> None:
    path = tmp_path / "workflows.yaml"
    path.write_text(laughs(4) + "workflows: [*l3]\n")  # 11,111 values: a big but honest file
    loaded = yamlsrc.load(path)
    assert len(loaded["workflows"][0]) == 10
