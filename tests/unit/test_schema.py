from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from dstack.cli.schema import workflows_schema

REPO = Path(__file__).resolve().parents[2]


def test_published_schema_is_up_to_date() -> None:
    published = json.loads((REPO / "docs" / "workflows.schema.json").read_text())
    assert published == workflows_schema(), "run: python -m dstack.cli.schema > docs/workflows.schema.json"


def test_example_and_seed_files_validate() -> None:
    schema = workflows_schema()
    jsonschema.validate(
        yaml.safe_load((REPO / "examples" / "hello" / ".dstack" / "workflows.yaml").read_text()), schema
    )
    seed = {
        "workflows": [
            {"name": "download", "provider": "python", "file": "download.py", "artifacts": ["data"]},
            {
                "name": "train",
                "depends-on": ["download:latest"],
                "provider": "python",
                "file": "train.py",
                "artifacts": ["model", {"path": "logs", "mount": True}],
                "resources": {"gpu": {"count": 1, "name": "A100", "memory": "40GB"}, "memory": "64GB"},
            },
        ]
    }
    jsonschema.validate(seed, schema)
    custom = {"name": "c", "provider": {"name": "hello", "repo": "file:///r"}, "nodes": 2, "resources": {"cpu": 1}}
    jsonschema.validate({"workflows": [custom]}, schema)  # 2022 custom provider: its own fields pass through


@pytest.mark.parametrize(
    "workflow",
    [
        {"name": "a", "provider": "bash"},  # no commands
        {"name": "a", "provider": "bash", "commands": ["x"], "comands": ["y"]},
        {"name": "a", "provider": "nope", "commands": ["x"]},
        {"name": "a", "provider": {"repo": "file:///r"}},  # a custom provider needs its name
        {"name": "a", "provider": "bash", "commands": ["x"], "resources": {"gpu": -1}},
    ],
)
def test_schema_rejects_what_the_loader_rejects(workflow: dict[str, object]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"workflows": [workflow]}, workflows_schema())
