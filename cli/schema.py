"""JSON Schema for .dstack/workflows.yaml, for editors, generated from the loader's own field tables.

Regenerate: `python -m dstack.cli.schema > docs/workflows.schema.json` (a test fails when it is stale).
"""

from __future__ import annotations

import json
from typing import Any

from dstack.cli.providers import known_providers, load_provider
from dstack.cli.workflows import COMMON_SCHEMA


def workflows_schema() -> dict[str, Any]:
    variants = []
    for name in known_providers():
        provider = load_provider(name)
        variants.append(
            {
                "if": {"properties": {"provider": {"const": name}}, "required": ["provider"]},
                "then": {
                    "properties": {**COMMON_SCHEMA, **provider.schema},
                    "required": ["name", "provider", *provider.required],
                    "additionalProperties": False,
                },
            }
        )
    workflow = {
        "type": "object",
        "properties": {**COMMON_SCHEMA, "provider": {"enum": known_providers()}},
        "required": ["name", "provider"],
        "allOf": variants,
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "dstack workflows (.dstack/workflows.yaml)",
        "type": "object",
        "properties": {"workflows": {"type": "array", "items": workflow}},
        "required": ["workflows"],
        "additionalProperties": False,
    }


def main() -> None:
    print(json.dumps(workflows_schema(), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
