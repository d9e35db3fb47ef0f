"""Providers lab, notebook and code (cli/providers/devenv.py): the job spec they make (port, app, URL path,
token), their fields as 2022 wrote them, and the environments their jobs run in (real venvs, no network).
The servers themselves run in tests/integration/test_dev_environments.py."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dstack.agent import env_helper
from dstack.agent.envcache import HELPER, applies_to
from dstack.agent.runtimes.base import LISTEN_VAR, RuntimeJob
from dstack.agent.runtimes.docker import DockerOptions, container_config, listen_address, pick_image
from dstack.cli.commands.run import build_request
from dstack.cli.errors import WorkflowError
from dstack.cli.providers import devenv, known_providers, pyenv
from dstack.protos.v1 import common_pb2
from tests.conftest import search, write_project

CORPUS = Path(__file__).resolve().parents[1] / "corpus2022"
VENV_BIN = str(Path(sys.executable).parent)  # the tests' environment, with jupyterlab and notebook


def job(tmp_path: Path, body: str, files: dict[str, str] | None = None) -> common_pb2.JobSpec:
    project = write_project(tmp_path / "p", "workflows:\n  - name: w\n" + body, files)
    [spec] = build_request(project, "w", []).submit.jobs
    return spec


def app_port(spec: common_pb2.JobSpec) -> common_pb2.PortSpec:
    [port] = [p for p in spec.ports if p.app]
    return port


@pytest.mark.parametrize(
    ("provider", "path", "token_var"),
    [("lab", "lab?token=", "JUPYTER_TOKEN"), ("notebook", "tree?token=", "JUPYTER_TOKEN"), ("code", "", "PASSWORD")],
)
def test_the_spec_declares_the_apps_port_with_its_url_and_a_token_of_its_own(
    tmp_path: Path, provider: str, path: str, token_var: str
) -> None:
    spec = job(tmp_path, f"    provider: {provider}\n")
    port = app_port(spec)
    assert port.app == provider and port.container_port == port.host_port
    assert devenv.PORT_RANGE[0] <= port.container_port <= devenv.PORT_RANGE[1]
    assert spec.env[devenv.PORT_VAR] == str(port.container_port)
    token = spec.env[token_var]
    assert len(token) >= 32 and token.replace("-", "").replace("_", "").isalnum()  # URL-safe, 192 bits
    assert port.url_path == (f"{path}{token}" if path else "")
    # The server reads it from its environment: never on a command line, which `ps` shows every user of the host.
    assert not any(token in c for c in spec.commands)
    again = job(tmp_path / "again", f"    provider: {provider}\n")
    assert again.env[token_var] != token  # a token per run


def test_the_workflows_own_token_variable_cannot_change_the_printed_url(tmp_path: Path) -> None:
    spec = job(
        tmp_path,
        "    provider: lab\n    environment:\n"
        "      JUPYTER_TOKEN: guessable\n      DSTACK_APP_PORT: 22\n      KEEP: me\n",
    )
    assert spec.env["JUPYTER_TOKEN"] != "guessable" and spec.env["KEEP"] == "me"
    assert app_port(spec).url_path == f"lab?token={spec.env['JUPYTER_TOKEN']}"
    assert spec.env["DSTACK_APP_PORT"] == str(app_port(spec).container_port)  # the port the tunnel forwards


def test_the_workflows_own_ports_stay_and_the_apps_port_is_another(tmp_path: Path) -> None:
    spec = job(tmp_path, "    provider: lab\n    ports: [6006, '8080:80']\n")
    plain = [(p.host_port, p.container_port, p.app) for p in spec.ports if not p.app]
    assert plain == [(6006, 6006, ""), (8080, 80, "")]
    assert app_port(spec).container_port not in {6006, 8080, 80}


def test_a_port_is_never_one_the_workflow_took() -> None:
    low, high = devenv.PORT_RANGE
    assert devenv.pick_port(set(range(low, high))) == high


def test_jupyter_from_the_interpreter_when_it_has_it_else_installed_into_the_jobs_environment(tmp_path: Path) -> None:
    spec = job(tmp_path, "    provider: lab\n    python: 3.10\n    version: 4.2\n    before_run: [echo setup]\n")
    assert spec.python_version == "3.10"  # 2022's unquoted 3.10, read by YAML as 3.1
    script = "\n".join(spec.commands)
    assert spec.commands[0] == "echo setup"
    assert "command -v python3.10 " in script
    # Already installed at that version: exec'd as it is (no network).
    assert 'sys.exit(m.version("jupyterlab") != "4.2")' in script
    assert search(r"then exec python3\.10 -m jupyterlab --no-browser", script)
    # Else through the python provider's environments: the agent's cache, or a venv of the job's own.
    assert "printf '%s\\n' jupyterlab==4.2 > .dstack-requirements-lab.txt" in script
    assert '-I "$DSTACK_ENV_HELPER" --requirements .dstack-requirements-lab.txt -- -m jupyterlab' in script
    assert spec.commands[-1].startswith("exec python -m jupyterlab ")
    assert '--ServerApp.ip="${DSTACK_LISTEN_ADDRESS:-127.0.0.1}" --ServerApp.port=$DSTACK_APP_PORT' in script
    assert "--ServerApp.port_retries=0" in script  # never silently on another port than the URL's


def test_requirements_go_with_jupyter_into_one_environment(tmp_path: Path) -> None:
    spec = job(
        tmp_path,
        "    provider: notebook\n    requirements: sub/requirements.txt\n",
        {"sub/requirements.txt": "tinypkg\n"},
    )
    script = "\n".join(spec.commands)
    assert "import notebook" not in script  # a venv for the requirements in any case
    # Next to the workflow's file, so that its own -r lines resolve and the cache key stays the same.
    assert "printf '%s\\n' '-r requirements.txt' notebook > sub/.dstack-requirements-notebook.txt" in script
    assert "--requirements sub/.dstack-requirements-notebook.txt -- -m notebook" in script


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        ("    provider: lab\n    version: '4.2; rm -rf ~'\n", 4, "version must look like 4.2.5"),
        ("    provider: code\n    version: $(id)\n", 4, "version must look like 4.2.5"),
        ("    provider: lab\n    python: 2.7\n", 4, "python must look like 3.11"),
        ("    provider: lab\n    file: x.py\n", 4, "unknown field 'file'"),
    ],
)
def test_mistakes_are_refused_at_their_line(tmp_path: Path, body: str, line: int, message: str) -> None:
    with pytest.raises(WorkflowError, match=message) as e:
        job(tmp_path, body)
    assert e.value.location is not None and e.value.location.line == line


def test_requirements_are_a_file_of_the_project_checked_before_submitting(tmp_path: Path) -> None:
    project = write_project(tmp_path / "p", "workflows:\n  - name: w\n    provider: lab\n    requirements: r.txt\n")
    [code_file] = build_request(project, "w", []).code_files
    assert (code_file.path, code_file.field) == ("r.txt", "requirements")


def test_code_needs_code_server_and_says_how_to_provide_it(tmp_path: Path) -> None:
    spec = job(tmp_path, "    provider: code\n    version: 4.96.4\n")
    first = spec.commands[0]
    assert first.startswith("command -v code-server >/dev/null || {") and "exit 127" in first
    assert "image: codercom/code-server" in first
    assert "grep -q -- '^4[.]96[.]4'" in spec.commands[1]
    assert spec.commands[-1] == (
        'exec code-server --bind-addr "${DSTACK_LISTEN_ADDRESS:-127.0.0.1}":$DSTACK_APP_PORT --auth password'
        " --disable-telemetry --disable-update-check ."
    )
    # Without code-server the job stops at once, saying so (a real shell, PATH without it).
    r = subprocess.run(
        ["bash", "-c", "set -e\n" + "\n".join(spec.commands)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **spec.env},
        cwd=tmp_path,
    )
    assert r.returncode == 127 and "the code provider needs code-server" in r.stderr


def test_the_providers_are_known_and_in_the_schema() -> None:
    assert {"lab", "notebook", "code"} <= set(known_providers())
    schema = json.loads((Path(__file__).resolve().parents[2] / "docs" / "workflows.schema.json").read_text())
    assert {"lab", "notebook", "code"} <= set(
        schema["properties"]["workflows"]["items"]["properties"]["provider"]["anyOf"][0]["enum"]
    )


def _report() -> Any:
    spec = importlib.util.spec_from_file_location("corpus2022_report", CORPUS / "report.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("number", ["019", "074"])
def test_2022_dev_environment_workflows_are_accepted(number: str) -> None:
    """dstack-examples' dev-environments (code, code with a GPU and 64GB, lab, notebook) and mnist-classifier's
    `vscode` (code with artifacts, depends-on and a K80)."""
    report = _report()
    [entry] = [e for e in json.loads((CORPUS / "sources.json").read_text()) if e["file"].startswith(number)]
    result = report.check_file(entry)
    assert result["file_error"] is None and not any(result["workflows"].values()), result


# --- where the job's servers listen, and its environment ----------------------------------------------------


def test_agents_tell_jobs_where_their_servers_must_listen() -> None:
    assert listen_address(DockerOptions(network="bridge")) == "0.0.0.0"  # the host reaches its interfaces
    assert listen_address(DockerOptions(network="host")) == "127.0.0.1"  # the host's loopback is its own
    assert LISTEN_VAR == devenv.LISTEN_VAR


def test_a_bridge_container_publishes_an_apps_port_on_the_hosts_loopback_only() -> None:
    """The team can read an app's token in the run's spec: its port is for the agent's tunnel, not for every
    interface of the GPU host (a plain `ports` entry stays published as before)."""
    lab = RuntimeJob(
        job_id="j",
        workdir=Path("/w"),
        working_dir=".",
        commands=["x"],
        env={},
        provider="lab",
        ports=[(6006, 6006), (18000, 18000)],
        loopback_ports=frozenset({18000}),
    )
    cfg = container_config(lab, DockerOptions(network="bridge"), "python:3.11-slim", "/agent")
    assert cfg["ports"] == {"6006/tcp": 6006, "18000/tcp": ("127.0.0.1", 18000)}


def test_jupyter_jobs_get_a_python_image_and_the_environment_cache() -> None:
    opts = DockerOptions(python_image="python:{version}-slim", bash_image="debian:bookworm-slim")
    lab = RuntimeJob(job_id="j", workdir=Path("/w"), working_dir=".", commands=[], env={}, provider="lab")
    assert pick_image(lab, opts) == "python:3.11-slim"
    assert applies_to("lab") and applies_to("notebook") and not applies_to("code") and not applies_to("bash")


def parent_venv_env() -> dict[str, str]:
    """The tests' own venv first on PATH, as .ci/run sets it: `python3` is a venv's interpreter."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSTACK_", "VIRTUAL_ENV", "PIP_"))}
    return env | {"PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"}


def test_a_venv_made_by_a_venvs_python_sees_its_packages(tmp_path: Path) -> None:
    """The job's own venv (no cache), made by `python3` of a venv that has jupyterlab: offline, jupyterlab is
    importable in it, after its own packages."""
    script = "set -e\n" + "\n".join(pyenv.venv_commands("python3", ""))
    probe = "import jupyterlab, sys; print(sys.prefix); print(jupyterlab.__file__)"
    r = subprocess.run(
        ["bash", "-c", f"{script}\npython -c {shlex.quote(probe)}"],
        capture_output=True,
        text=True,
        env=parent_venv_env(),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    prefix, module = r.stdout.splitlines()
    assert Path(prefix) == tmp_path / pyenv.VENV and module.startswith(VENV_BIN.removesuffix("bin"))


def test_the_helpers_venv_made_by_a_venvs_python_sees_its_packages_too(tmp_path: Path) -> None:
    (tmp_path / "req.txt").write_text("")
    env = parent_venv_env() | {"DSTACK_ENV_CACHE": str(tmp_path / "cache"), "DSTACK_ENV_CACHE_MAX_BYTES": "0"}
    r = subprocess.run(
        [
            sys.executable,
            str(HELPER),
            "--requirements",
            "req.txt",
            "--",
            "-c",
            "import jupyterlab, sys; print(sys.prefix)",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == str(tmp_path / env_helper.LOCAL_VENV)
    # Cached environments made this way are keyed apart from those made before (which lack the parent's packages).
    key = env_helper.env_key(str(tmp_path / "req.txt"))
    material = {
        "interpreter": env_helper.interpreter_identity(),
        "requirements": env_helper.requirements_digest(str(tmp_path / "req.txt")),
    }
    assert key != hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
