"""Dev environments: JupyterLab (`lab`), Jupyter Notebook (`notebook`) and code-server (`code`).

Each job starts the server in the job's own environment (its Python version and `requirements`, with
`before_run`, `environment`, `artifacts` and `resources` as for `python`), listening on one port that the
job spec declares with the app's name and the URL path that logs in (`lab?token=...`), so that `dstack run`
and `dstack attach` print `http://127.0.0.1:LOCAL/<url_path>` through the tunnel. It runs until stopped.

Who can reach it (docs/dev-environments.md, "Who can see the token"): the server listens on 127.0.0.1 of the
job (inside a container on a bridge network: the container's own interfaces, which the agent reaches), and
the tunnel is open only to the run's owner and admins. The token is a second lock, against other users and
processes of the GPU host: it is part of the job spec, which every user of the team can read (`dstack ps`,
GetRun), so it is no secret from the team. It reaches the server through its environment, never its command
line (which every user of the host can read in `ps`).
"""

from __future__ import annotations

import posixpath
import re
import secrets
import shlex

from dstack.cli import fields
from dstack.cli.errors import ProviderError
from dstack.cli.providers import pyenv
from dstack.cli.providers.base import Provider
from dstack.cli.spec import Workflow
from dstack.protos.v1 import common_pb2

PORT_VAR = "DSTACK_APP_PORT"  # the port the app listens on (also declared in the job spec)
# Where the agent says a job's servers must listen for its tunnel to reach them: 127.0.0.1 on a host or on a
# container sharing the host's network; 0.0.0.0 in a container with a network of its own (agent/runtimes/).
LISTEN_VAR = "DSTACK_LISTEN_ADDRESS"
LISTEN = f'"${{{LISTEN_VAR}:-127.0.0.1}}"'
# Below Linux's ephemeral range (32768-60999), where outgoing connections take their local ports.
PORT_RANGE = (10000, 32767)
TOKEN_BYTES = 24  # 192 bits, URL-safe (no quoting in the URL)
_VERSION = re.compile(r"^[0-9][0-9A-Za-z.+!-]*$")  # 4.2.5, 4.3.0rc1, 1!2.0: PEP 440, and code-server's 4.96.4


def pick_port(taken: set[int]) -> int:
    """A port for the app, other than the workflow's own `ports`. Chosen here rather than by the agent so
    that the spec (and so the tunnel and the printed URL) names it; one already in use on the host fails the
    job with the server's own "address already in use", never a silent move to another port."""
    rng = secrets.SystemRandom()
    while True:
        port = rng.randint(*PORT_RANGE)
        if port not in taken:
            return port


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def app_version(wf: Workflow) -> str:
    """`version`: of the app (JupyterLab, Notebook, code-server), as 2022's providers read it; empty: any."""
    if wf.node.get("version") is None:
        return ""
    text = fields.scalar_text(wf.node, "version")
    if not _VERSION.match(text):
        raise ProviderError(f"version must look like 4.2.5, got {text!r}", wf.node.at("version"))
    return text


class DevEnvironmentProvider(Provider):
    """What `lab`, `notebook` and `code` share: the token, the port and its PortSpec."""

    app: str  # the PortSpec's app
    token_var: str  # the environment variable the server reads its token (password) from

    def url_path(self, token: str) -> str:
        raise NotImplementedError

    def job_specs(self, wf: Workflow) -> list[common_pb2.JobSpec]:
        specs = super().job_specs(wf)
        token = new_token()
        for spec in specs:
            port = pick_port({p.container_port for p in spec.ports} | {p.host_port for p in spec.ports})
            # After the workflow's `environment`: the URL printed must be the one the server takes.
            spec.env[self.token_var] = token
            spec.env[PORT_VAR] = str(port)
            spec.ports.append(
                common_pb2.PortSpec(container_port=port, host_port=port, app=self.app, url_path=self.url_path(token))
            )
        return specs


class JupyterProvider(DevEnvironmentProvider):
    """JupyterLab or Jupyter Notebook, from the job's environment, installed into it when missing."""

    package: str  # the distribution on PyPI
    module: str  # run as `python -m MODULE`
    token_var = "JUPYTER_TOKEN"  # read by jupyter_server (IdentityProvider.token)
    schema = {
        "python": {"type": ["string", "number"], "description": "the Python version, e.g. '3.11'"},
        "version": {
            "type": ["string", "number"],
            "description": "the version of JupyterLab (lab) or Notebook (notebook), installed when another is found",
        },
        "requirements": {"type": "string", "description": "a requirements.txt installed into a venv first"},
    }
    code_file_fields = ("requirements",)

    def python_version(self, wf: Workflow) -> str:
        return pyenv.version(wf, ("python",))  # the agent's --docker-image-python, e.g. python:{version}-slim

    def requirement(self, wf: Workflow) -> str:
        version = app_version(wf)
        return f"{self.package}=={version}" if version else self.package

    def server_args(self) -> str:
        # port_retries=0: a port in use fails the job instead of serving on another than the URL names.
        # allow_root: container images run as root; the token, not the user, guards the server.
        return (
            f"-m {self.module} --no-browser --ServerApp.ip={LISTEN} --ServerApp.port=${PORT_VAR}"
            " --ServerApp.port_retries=0 --ServerApp.allow_root=True"
        )

    def commands(self, wf: Workflow) -> list[str]:
        python = pyenv.interpreter(self.python_version(wf))
        requirements = pyenv.requirements_path(wf)
        run = self.server_args()
        cmds = [pyenv.require_interpreter(python)]
        version = app_version(wf)
        if not requirements:
            # Already there (an image or host with it, the team's own environment): used as it is, offline.
            check = (
                f'import importlib.metadata as m, sys; sys.exit(m.version("{self.package}") != "{version}")'
                if version
                else f"import {self.module}"
            )
            cmds += [
                f"if {python} -c {shlex.quote(check)} 2>/dev/null; then exec {python} {run}; fi",
                f"echo 'dstack: {self.requirement(wf)} is not installed for {python}: installing it'",
            ]
        # The python provider's environments (the agent's cache, else a venv of the job's own), made for the
        # workflow's requirements plus the app: a file that includes theirs, next to it so that pip resolves
        # their own -r/-c lines as before and the cache's key stays the same from one job to the next.
        folder = posixpath.dirname(requirements)
        combined = posixpath.join(folder, f".dstack-requirements-{self.name}.txt")
        lines = ([f"-r {posixpath.basename(requirements)}"] if requirements else []) + [self.requirement(wf)]
        cmds += [
            f"printf '%s\\n' {shlex.join(lines)} > {shlex.quote(combined)}",
            pyenv.cached_env_exec(python, shlex.quote(combined), run),
            *pyenv.venv_commands(python, combined),
            f"exec python {run}",
        ]
        return cmds


class LabProvider(JupyterProvider):
    """JupyterLab: `dstack run` prints http://127.0.0.1:LOCAL/lab?token=..."""

    name = "lab"
    app = "lab"
    package = "jupyterlab"
    module = "jupyterlab"

    def url_path(self, token: str) -> str:
        return f"lab?token={token}"


class NotebookProvider(JupyterProvider):
    """Jupyter Notebook (7, on jupyter_server): `dstack run` prints http://127.0.0.1:LOCAL/tree?token=..."""

    name = "notebook"
    app = "notebook"
    package = "notebook"
    module = "notebook"

    def url_path(self, token: str) -> str:
        return f"tree?token={token}"


CODE_SERVER_MISSING = (
    "dstack: the code provider needs code-server (https://github.com/coder/code-server) on the job's PATH,"
    " and it is not there: use an image that has it (image: codercom/code-server), or install it in before_run"
    " (on a host: its standalone release in ~/.local, see code-server's install.sh --method standalone)"
)


class CodeProvider(DevEnvironmentProvider):
    """code-server (VS Code in the browser), which is not on PyPI: it must be on the job's PATH (the image's,
    or the host's), else the job fails saying how to provide it. With `python` or `requirements`, a venv of
    the job's own comes first on PATH, so the IDE's terminal and Python extension use it."""

    name = "code"
    app = "code"
    token_var = "PASSWORD"  # read by code-server (--auth password)
    schema = {
        "python": {"type": ["string", "number"], "description": "the Python version of the job's venv, e.g. '3.11'"},
        "version": {"type": ["string", "number"], "description": "the code-server version the job must find"},
        "requirements": {"type": "string", "description": "a requirements.txt installed into a venv first"},
    }
    code_file_fields = ("requirements",)

    def url_path(self, token: str) -> str:
        # code-server logs in with a form: the page asks for the password (the token, also in the job's log).
        return ""

    def python_version(self, wf: Workflow) -> str:
        return pyenv.version(wf, ("python",))

    def commands(self, wf: Workflow) -> list[str]:
        cmds = [f"command -v code-server >/dev/null || {{ echo {shlex.quote(CODE_SERVER_MISSING)} >&2; exit 127; }}"]
        if want := app_version(wf):
            cmds.append(
                f"code-server --version | head -n1 | grep -q -- {shlex.quote('^' + want.replace('.', '[.]'))}"
                f' || {{ echo "dstack: code-server $(code-server --version | head -n1) is not {want}" >&2; exit 1; }}'
            )
        version = self.python_version(wf)
        requirements = pyenv.requirements_path(wf)
        if version or requirements:  # as the bash provider does
            python = pyenv.interpreter(version)
            cmds += [pyenv.require_interpreter(python), *pyenv.venv_commands(python, requirements)]
        cmds += [
            f'echo "dstack: code-server\'s password is ${self.token_var}"',
            f"exec code-server --bind-addr {LISTEN}:${PORT_VAR} --auth password --disable-telemetry"
            " --disable-update-check .",
        ]
        return cmds
