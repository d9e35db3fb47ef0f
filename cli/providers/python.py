from __future__ import annotations

import re
import shlex

from cli import fields
from cli.errors import ProviderError
from cli.providers.base import Provider
from cli.spec import Workflow

_VERSION = re.compile(r"^3(\.\d{1,2})?$")


class PythonProvider(Provider):
    """Runs `file` with `args` under Python `version`, after installing `requirements` into a venv."""

    name = "python"
    schema = {
        "file": {"type": "string", "description": "the script, relative to the working directory"},
        "args": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "requirements": {"type": "string", "description": "a requirements.txt installed into a venv first"},
        "version": {"type": ["string", "number"], "description": "Python version, e.g. '3.11'"},
        "python": {"type": ["string", "number"], "description": "same as version"},
    }
    required = ("file",)

    def _version(self, wf: Workflow) -> str:
        key = "version" if "version" in wf.node else "python"
        raw = wf.node.get(key)
        if raw is None:
            return ""
        # As written: YAML would read `version: 3.10` as the number 3.1.
        version = wf.node.raw_values.get(key, str(raw))
        if not _VERSION.match(version):
            raise ProviderError(f"{key} must look like 3.11, got {raw!r}", wf.node.at(key))
        return version

    def commands(self, wf: Workflow) -> list[str]:
        file = fields.relative_path(wf.node, "file", fields.string(wf.node, "file", required=True))
        args = wf.node.get("args")
        if isinstance(args, str):
            arg_text = args  # a string is passed as the user wrote it, shell words and all
        else:
            arg_text = shlex.join(fields.string_list(wf.node, "args"))
        if wf.run_args:  # `dstack run train --lr 0.1`: arguments that are not variables go to the script
            arg_text = f"{arg_text} {shlex.join(wf.run_args)}".strip()
        version = self._version(wf)
        python = f"python{version}" if version else "python3"
        cmds = [
            f"command -v {python} >/dev/null || {{ echo 'dstack: {python} is not installed on this host' >&2;"
            " exit 127; }"
        ]
        requirements = fields.string(wf.node, "requirements")
        if requirements:
            req = shlex.quote(fields.relative_path(wf.node, "requirements", requirements))
            cmds += [
                f"{python} -m venv --system-site-packages .dstack-venv",
                ". .dstack-venv/bin/activate",
                f"python -m pip install --disable-pip-version-check -q -r {req}",
                "PYTHON=python",
            ]
        else:
            cmds.append(f"PYTHON={python}")
        cmds.append(f"exec $PYTHON {shlex.quote(file)} {arg_text}".rstrip())
        return cmds

    def python_version(self, wf: Workflow) -> str:
        return self._version(wf)  # the agent's --docker-image-python, e.g. python:{version}-slim
