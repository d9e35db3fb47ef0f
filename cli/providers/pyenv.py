"""What the python and bash providers share: the Python version a workflow asks for, and the commands
that put that interpreter (and the workflow's requirements) first on PATH."""

from __future__ import annotations

import re
import shlex

from dstack.cli import fields
from dstack.cli.errors import ProviderError
from dstack.cli.spec import Workflow

_VERSION = re.compile(r"^3(\.\d{1,2})?$")
VENV = ".dstack-venv"
BIN = ".dstack-bin"  # where `python` points at the version when no venv can be made
HELPER_VAR = "DSTACK_ENV_HELPER"  # set by the agent (agent/envcache.py): its environment cache's helper


def version(wf: Workflow, keys: tuple[str, ...]) -> str:
    """The first of `keys` the workflow sets, as written ("3.10", not 3.1); empty when none is set."""
    key = next((k for k in keys if k in wf.node and wf.node[k] is not None), "")
    if not key:
        return ""
    raw = wf.node[key]
    if isinstance(raw, (bool, dict, list)):
        raise ProviderError(f"{key} must look like 3.11, got {raw!r}", wf.node.at(key))
    written = raw if isinstance(raw, str) else wf.node.raw_values.get(key, str(raw))
    # 2022 dstack (`_safe_python_version`) read the number 3.1, which is what YAML makes of an unquoted
    # `python: 3.10` in its own examples, as 3.10; a quoted "3.1" stays 3.1.
    if not isinstance(raw, str) and written == "3.1":
        written = "3.10"
    if not _VERSION.match(written):
        raise ProviderError(f"{key} must look like 3.11, got {raw!r}", wf.node.at(key))
    return written


def interpreter(version_text: str) -> str:
    return f"python{version_text}" if version_text else "python3"


def require_interpreter(python: str) -> str:
    """Fails the job with a clear message (exit 127, as a shell does) when the host lacks the interpreter."""
    return (
        f"command -v {python} >/dev/null || {{ echo 'dstack: {python} is not installed on this host' >&2; exit 127; }}"
    )


def requirements_path(wf: Workflow) -> str:
    value = fields.string(wf.node, "requirements")
    return fields.relative_path(wf.node, "requirements", value) if value else ""


# Run by the interpreter that made the venv (argv[1]): when that interpreter is itself a venv's, the new venv
# also sees that venv's packages, after its own; --system-site-packages alone shows only the base
# interpreter's (agent/env_helper.py `inherit_parent_packages` does the same in the environment cache).
INHERIT_PARENT = (
    "import os, sys, sysconfig\n"
    "if sys.prefix != sys.base_prefix:\n"
    "    own = os.path.join(sys.argv[1], 'lib', 'python%d.%d' % sys.version_info[:2], 'site-packages')\n"
    "    dirs = dict.fromkeys([sysconfig.get_path('purelib'), sysconfig.get_path('platlib')])\n"
    "    with open(os.path.join(own, 'dstack-parent-env.pth'), 'w') as f:\n"
    "        f.writelines('import site; site.addsitedir(%r)\\n' % d for d in dirs)\n"
)


def venv_commands(python: str, requirements: str) -> list[str]:
    """A venv of the job's own made with `python` and activated, so that `python` and `pip` in the commands
    that follow are that interpreter; `requirements` (a path, or empty) are installed into it first.
    --system-site-packages: what the image or host already has stays importable. With pip even without
    requirements: 2022 commands run `pip install ...` themselves, which must install here, not into
    whatever other environment's pip is next on PATH."""
    cmds = [
        f"if {python} -c 'import ensurepip, venv' 2>/dev/null; then"
        f" {python} -m venv --system-site-packages {VENV} && {python} -c {shlex.quote(INHERIT_PARENT)} {VENV}"
        f" && . {VENV}/bin/activate;"
        # An image with a bare interpreter (Debian's python3-minimal has neither venv nor ensurepip): the
        # commands still get that version as `python`, and requirements go to it, as 2022's images did.
        f" else echo 'dstack: {python} cannot make a venv here: using it as python directly' >&2;"
        f' mkdir -p {BIN} && ln -sf "$(command -v {python})" {BIN}/python && export PATH="$PWD/{BIN}:$PATH"; fi'
    ]
    if requirements:
        cmds += [
            "echo 'dstack: installing requirements into a new environment .dstack-venv'",
            f"python -m pip install --disable-pip-version-check -r {shlex.quote(requirements)}",
        ]
    return cmds


def cached_env_exec(python: str, requirements: str, run: str) -> str:
    """On an agent with an environment cache (which says where its helper is): reuse a venv made for the same
    interpreter and `requirements` (a quoted path), or make one, then exec `python RUN` in it. Without a cache
    (an older agent) the command does nothing and the commands after it make a venv of the job's own.
    -I: nothing next to the helper (the agent's own modules) or in PYTHON* shadows its imports."""
    helper = f'"${HELPER_VAR}"'
    return f'if [ -f "${{{HELPER_VAR}:-}}" ]; then exec {python} -I {helper} --requirements {requirements} -- {run}; fi'
