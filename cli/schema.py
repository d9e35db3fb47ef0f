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
        "properties": {**COMMON_SCHEMA, "provider": _provider_schema()},
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


def _provider_schema() -> dict[str, Any]:
    """A built-in or installed provider, or (2022) `{name, repo}` from a git repository (cli/providers/custom.py).

    A bare name from the project's own .dstack/providers.yaml is not in it: the schema is one for every project,
    and accepting any string would stop it catching a misspelt provider, the commoner case."""
    custom = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "description": "NAME or NAME@BRANCH of the repository's providers.yaml"},
            "repo": {"type": "string", "description": "git URL, file:// URL or local path"},
        },
        "required": ["name"],
        "additionalProperties": False,
    }
    return {"anyOf": [{"enum": known_providers()}, custom]}


def main() -> None:
    print(json.dumps(workflows_schema(), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
