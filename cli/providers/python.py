from __future__ import annotations

import shlex

from dstack.cli import fields
from dstack.cli.errors import ProviderError
from dstack.cli.providers import pyenv
from dstack.cli.providers.base import Provider
from dstack.cli.spec import Workflow

# The script's field by year: `python_script` (early 2022: "the Python script with arguments"), `script`
# (mid 2022), `file` (late 2022 and today). One of them, not two.
SCRIPT_FIELDS = ("file", "script", "python_script")


class PythonProvider(Provider):
    """Runs `file` with `args` under Python `version`, after installing `requirements` into a venv."""

    name = "python"
    schema = {
        "file": {"type": "string", "description": "the script, relative to the working directory"},
        "script": {"type": "string", "description": "same as file (mid-2022 name)"},
        "python_script": {
            "type": "string",
            "description": "the script and its arguments, e.g. 'train.py --epochs 3' (early-2022 name of file)",
        },
        "args": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "requirements": {"type": "string", "description": "a requirements.txt installed into a venv first"},
        "version": {"type": ["string", "number"], "description": "Python version, e.g. '3.11'"},
        "python": {"type": ["string", "number"], "description": "same as version"},
    }
    passes_run_args = True  # `dstack run train --lr 0.1`: what is not a variable goes to the script
    code_file_fields = (*SCRIPT_FIELDS, "requirements")

    def _version(self, wf: Workflow) -> str:
        return pyenv.version(wf, ("version", "python"))

    def _script(self, wf: Workflow) -> tuple[str, str]:
        """(the script's path, the arguments written with it): `python_script: train.py --epochs 3` ran
        `python train.py --epochs 3` in 2022, so its first word is the script and the rest are arguments."""
        present = [k for k in SCRIPT_FIELDS if k in wf.node]
        if len(present) > 1:
            raise ProviderError(
                f"{present[0]!r} and {present[1]!r} both name the script: keep one", wf.node.at(present[1])
            )
        if not present:
            raise ProviderError("missing required field 'file' (the script to run)", wf.node.location)
        key = present[0]
        text = fields.string(wf.node, key, required=True)
        if key != "python_script":
            return fields.relative_path(wf.node, key, text), ""
        try:
            words = shlex.split(text)
        except ValueError as e:
            raise ProviderError(f"python_script {text!r}: {e}", wf.node.at(key)) from None
        if not words:
            raise ProviderError("python_script is empty: give the script, e.g. train.py", wf.node.at(key))
        return fields.relative_path(wf.node, key, words[0]), text.strip()[len(words[0]) :].strip()

    def code_file(self, wf: Workflow, key: str) -> str:
        value = super().code_file(wf, key)
        return shlex.split(value)[0] if key == "python_script" and value.strip() else value

    def commands(self, wf: Workflow) -> list[str]:
        file, script_args = self._script(wf)
        args = wf.node.get("args")
        if isinstance(args, str):
            arg_text = args  # a string is passed as the user wrote it, shell words and all
        else:
            arg_text = shlex.join(fields.string_list(wf.node, "args"))
        arg_text = f"{script_args} {arg_text}".strip()
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
                pyenv.cached_env_exec(python, req, self.python_argv(run)),
                # An agent without one (older): a venv of the job's own, as before.
                "echo 'dstack: installing requirements into a new environment .dstack-venv'",
                f"{python} -m venv --system-site-packages .dstack-venv",
                ". .dstack-venv/bin/activate",
                f"python -m pip install --disable-pip-version-check -r {req}",
                "PYTHON=python",
            ]
        else:
            cmds.append(f"PYTHON={python}")
        cmds.append(self.launch("$PYTHON", run))
        return cmds

    def python_argv(self, run: str) -> str:
        """What the environment helper's python runs (after its `--`): the script and its arguments."""
        return run

    def launch(self, python: str, run: str) -> str:
        """The last command: `python` (a shell word: $PYTHON) runs the script with its arguments."""
        return f"exec {python} {run}"

    def python_version(self, wf: Workflow) -> str:
        return self._version(wf)  # the agent's --docker-image-python, e.g. python:{version}-slim
