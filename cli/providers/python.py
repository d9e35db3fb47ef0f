from __future__ import annotations

import re
import shlex

from dstack.cli import fields
from dstack.cli.errors import ProviderError
from dstack.cli.providers.base import Provider
from dstack.cli.spec import Workflow

_VERSION = re.compile(r"^3(\.\d{1,2})?$")
HELPER_VAR = "DSTACK_ENV_HELPER"  # set by the agent (agent/envcache.py): its environment cache's helper


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
    passes_run_args = True  # `dstack run train --lr 0.1`: what is not a variable goes to the script
    code_file_fields = ("file", "requirements")

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
        run = f"{shlex.quote(file)} {arg_text}".rstrip()
        if requirements:
            req = shlex.quote(fields.relative_path(wf.node, "requirements", requirements))
            cmds += [
                # An agent with an environment cache says where its helper is: it reuses a venv made
                # for the same interpreter and requirements, or makes one, then execs the script.
                # -I: nothing next to the helper (the agent's own modules) or in PYTHON* shadows its imports.
                f'if [ -f "${{{HELPER_VAR}:-}}" ]; then'
                f' exec {python} -I "${HELPER_VAR}" --requirements {req} -- {run}; fi',
                # An agent without one (older): a venv of the job's own, as before.
                "echo 'dstack: installing requirements into a new environment .dstack-venv'",
                f"{python} -m venv --system-site-packages .dstack-venv",
                ". .dstack-venv/bin/activate",
                f"python -m pip install --disable-pip-version-check -r {req}",
                "PYTHON=python",
            ]
        else:
            cmds.append(f"PYTHON={python}")
        cmds.append(f"exec $PYTHON {run}")
        return cmds

    def python_version(self, wf: Workflow) -> str:
        return self._version(wf)  # the agent's --docker-image-python, e.g. python:{version}-slim
