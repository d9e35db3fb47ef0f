from __future__ import annotations

from dstack.cli import fields
from dstack.cli.providers.base import Provider
from dstack.cli.spec import Workflow


class BashProvider(Provider):
    """Runs `commands` with bash, in order; the first failing command fails the job."""

    name = "bash"
    schema = {"commands": {"type": "array", "items": {"type": "string"}, "description": "run by bash, in order"}}
    required = ("commands",)

    def commands(self, wf: Workflow) -> list[str]:
        return fields.string_list(wf.node, "commands", required=True)
