from __future__ import annotations

from dstack.cli import fields
from dstack.cli.providers import pyenv
from dstack.cli.providers.base import Provider
from dstack.cli.spec import Workflow


class BashProvider(Provider):
    """Runs `commands` with bash, in order; the first failing command fails the job.

    As in the August-December 2022 docs, `python: 3.10` makes that version the `python` of the commands
    and `requirements: requirements.txt` is installed before them (both in a venv of the job's own)."""

    name = "bash"
    schema = {
        "commands": {"type": "array", "items": {"type": "string"}, "description": "run by bash, in order"},
        "python": {
            "type": ["string", "number"],
            "description": "the Python version that is `python` for the commands, e.g. '3.10' (2022)",
        },
        "requirements": {"type": "string", "description": "a requirements.txt installed before `commands` (2022)"},
    }
    required = ("commands",)
    code_file_fields = ("requirements",)

    def commands(self, wf: Workflow) -> list[str]:
        commands = fields.string_list(wf.node, "commands", required=True)
        version = pyenv.version(wf, ("python",))
        requirements = pyenv.requirements_path(wf)
        if not version and not requirements:
            return commands
        python = pyenv.interpreter(version)
        return [pyenv.require_interpreter(python), *pyenv.venv_commands(python, requirements), *commands]

    def python_version(self, wf: Workflow) -> str:
        return pyenv.version(wf, ("python",))  # the agent's --docker-image-python, e.g. python:{version}-slim
