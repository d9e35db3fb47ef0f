from __future__ import annotations

from dstack.cli import fields
from dstack.cli.errors import ProviderError
from dstack.cli.providers.base import Provider
from dstack.cli.spec import Workflow


class DockerProvider(Provider):
    """Runs a container from `image`: its `commands` in order, or without them the image's own command.

    Its jobs run only on agents with the docker runtime (never as host processes). `ports` and
    `resources` are the common workflow fields."""

    name = "docker"
    schema = {
        "commands": {
            "type": "array",
            "items": {"type": "string"},
            "description": "run by the image's shell, in order; without them the image's own command runs",
        },
    }
    required = ("image",)
    needs_container = True

    def validate(self, wf: Workflow) -> None:
        fields.string(wf.node, "image", required=True)
        if wf.before_run and not self.commands(wf):
            raise ProviderError(
                "'before_run' needs 'commands' with the docker provider (the image's own command runs alone)",
                wf.node.at("before_run"),
            )

    def commands(self, wf: Workflow) -> list[str]:
        return fields.string_list(wf.node, "commands")
