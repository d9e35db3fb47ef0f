"""Providers lab, notebook and code with real processes: a coordinator, a host agent, and the server in the job.

JupyterLab and Notebook come from the tests' own environment (pyproject's dev extras), which the job finds
first on PATH as it does under .ci/run: no network. code-server is not on PyPI; a stand-in on PATH shows the
command the job runs, and without one the job fails saying how to provide it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from dstack.protos.v1 import client_pb2, client_pb2_grpc, common_pb2
from tests.conftest import Cluster, search, wait_for, write_project
from tests.tinywheel import build_wheel, offline_requirements

pytestmark = pytest.mark.integration

VENV_BIN = str(Path(sys.executable).parent)  # where jupyterlab and notebook are installed


@pytest.fixture
def lab_cluster(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A cluster whose host agent's jobs find the tests' Python (with jupyterlab) first on PATH."""
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    cluster.start_coordinator()
    cluster.start_agent()
    yield cluster


def job_of(cluster: Cluster, run: str) -> client_pb2.Job:
    stub = client_pb2_grpc.ClientServiceStub(cluster.channel())
    auth = [("authorization", f"Bearer {cluster.admin_token}")]
    reply: client_pb2.GetRunResponse = stub.GetRun(client_pb2.GetRunRequest(name=run), metadata=auth, timeout=30)
    [job] = reply.run.jobs
    return job


def app_port(job: client_pb2.Job) -> common_pb2.PortSpec:
    [port] = [p for p in job.spec.ports if p.app]
    return port


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""  # not listening (yet, or any more)


def listener(token: str) -> psutil.Process | None:
    """The server: of the processes with the token, the one listening."""
    for p in processes_with(token):
        try:
            if any(c.status == psutil.CONN_LISTEN for c in p.net_connections("inet")):
                return p
        except psutil.Error:
            continue
    return None


def refuses_connections(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def submit(cluster: Cluster, project: Path, workflow: str) -> str:
    r = cluster.cli("run", workflow, "-d", cwd=project)
    assert r.returncode == 0, r.stderr
    return search(r"(\S+) submitted", r.stderr).group(1)


def processes_with(token: str) -> list[psutil.Process]:
    """The processes whose environment carries the token: the server and its kernels."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("JUPYTER_TOKEN") == token:
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.mark.parametrize(("workflow", "path"), [("lab", "lab"), ("notebook", "tree")])
def test_jupyter_serves_its_api_with_the_token_until_stopped(
    lab_cluster: Cluster, tmp_path: Path, workflow: str, path: str
) -> None:
    cluster = lab_cluster
    project = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: ide
            provider: {workflow}
            environment:
              GREETING: hello from the job
            before_run:
              - echo "before_run ran, $GREETING"
        """,
    )
    run = submit(cluster, project, "ide")
    job = job_of(cluster, run)
    port = app_port(job)
    assert port.app == workflow and port.container_port == port.host_port
    token = search(rf"^{path}\?token=([\w-]+)$", port.url_path).group(1)
    assert len(token) >= 32 and job.spec.env["JUPYTER_TOKEN"] == token
    base = f"http://127.0.0.1:{port.container_port}"

    status = wait_for(
        lambda: s if (s := http_get(f"{base}/api/status?token={token}"))[0] == 200 else None,
        timeout=120,
        interval=0.5,
        what=f"{workflow} to answer on port {port.container_port}",
    )
    assert "started" in json.loads(status[1])
    code, body = http_get(f"{base}/api/kernelspecs?token={token}")
    assert code == 200 and "python3" in json.loads(body)["kernelspecs"]
    # The page the printed URL opens.
    assert http_get(f"{base}/{port.url_path}")[0] == 200

    # Without the token, or with another, the API refuses.
    assert http_get(f"{base}/api/kernelspecs")[0] == 403
    assert http_get(f"{base}/api/kernelspecs?token=not-{token}")[0] == 403
    # Only on the loopback address (DSTACK_LISTEN_ADDRESS of a host agent), and never on the command line
    # that every user of the host can read in `ps`.
    server = wait_for(lambda: listener(token), what="the server's process")
    assert {c.laddr for c in server.net_connections("inet") if c.status == psutil.CONN_LISTEN} == {
        ("127.0.0.1", port.container_port)
    }
    assert token not in " ".join(server.cmdline())
    assert server.environ().get("GREETING") == "hello from the job"  # the workflow's environment

    # A kernel, as a notebook starts one: a process of the job's, in the job's environment.
    start = urllib.request.Request(
        f"{base}/api/kernels?token={token}", data=b"{}", method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(start, timeout=60) as answer:
        assert answer.status == 201
    kernels = wait_for(lambda: [c for c in server.children(recursive=True) if "ipykernel" in " ".join(c.cmdline())])

    # It keeps running: a job that serves ends only when stopped.
    assert cluster.run_info(run)["status"] == "running"
    r = cluster.cli("stop", run)
    assert r.returncode == 0, r.stderr
    info = cluster.wait_status(run, {"stopped", "failed", "done"}, timeout=120)
    assert info["status"] == "stopped", info
    assert info["jobs"][0]["termination_reason"] == "stopped by user"
    wait_for(lambda: refuses_connections(port.container_port), what="the port to close")
    wait_for(lambda: not processes_with(token), what="the server to exit")
    wait_for(lambda: not any(k.is_running() for k in kernels), what="its kernels to exit")
    logs = cluster.cli("logs", run)
    assert "before_run ran, hello from the job" in logs.stdout
    assert "Jupyter Server" in logs.stdout + logs.stderr  # the server's own log, in the job's


def test_lab_in_the_jobs_venv_with_requirements(lab_cluster: Cluster, tmp_path: Path) -> None:
    """`requirements` (with the cache's helper, as the python provider) plus jupyterlab from the interpreter
    the job uses: the requirements' package is importable in the lab's kernel environment."""
    cluster = lab_cluster
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: ide
            provider: lab
            requirements: requirements.txt
        """,
        # Offline: only the folder's wheels, and what the job's interpreter already has (jupyterlab).
        {"requirements.txt": offline_requirements("wheels", "ideprobe")},
    )
    build_wheel(project / "wheels", "ideprobe", "1.0", "from the requirements")
    run = submit(cluster, project, "ide")
    port = app_port(job_of(cluster, run))
    token = port.url_path.partition("token=")[2]
    base = f"http://127.0.0.1:{port.container_port}"
    wait_for(
        lambda: http_get(f"{base}/api/status?token={token}")[0] == 200,
        timeout=240,
        interval=0.5,
        what="lab to answer",
    )
    server = wait_for(lambda: listener(token), what="the server's process")
    venv = server.environ()["VIRTUAL_ENV"]  # the cache's environment for these requirements (+ jupyterlab)
    assert Path(venv).parent == cluster.tmp / "agent-1" / "envs", venv
    assert server.cmdline()[0].startswith(venv)
    probe = subprocess.run(
        [f"{venv}/bin/python", "-c", "import ideprobe, jupyterlab; print(ideprobe.VALUE)"],
        capture_output=True,
        text=True,
    )
    assert probe.stdout == "from the requirements\n", probe.stderr
    cluster.cli("stop", run)
    assert cluster.wait_status(run, {"stopped", "failed", "done"}, timeout=120)["status"] == "stopped"


def test_a_missing_jupyter_is_installed_into_the_jobs_environment_and_pip_says_why_it_cannot(
    lab_cluster: Cluster, tmp_path: Path
) -> None:
    """A version the interpreter does not have goes to pip, in the cache's environment; offline (no index),
    pip's own error fails the job, and no half-made environment is left."""
    cluster = lab_cluster
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: ide
            provider: lab
            version: 0.0.1
            environment:
              PIP_NO_INDEX: "1"
        """,
    )
    run = submit(cluster, project, "ide")
    info = cluster.wait_status(run, {"failed", "done", "stopped"}, timeout=180)
    assert info["status"] == "failed" and info["jobs"][0]["exit_code"] == 1, info
    logs = cluster.cli("logs", run)
    text = logs.stdout + logs.stderr
    assert "dstack: jupyterlab==0.0.1 is not installed for python3: installing it" in text
    assert "jupyterlab==0.0.1" in text and "pip install failed" in text
    envs = cluster.tmp / "agent-1" / "envs"
    assert not [p for p in envs.iterdir() if p.is_dir()], list(envs.iterdir())


CODE_SERVER_STAND_IN = textwrap.dedent(
    """\
    #!{python}
    # A stand-in for code-server: records how it was started, then serves as it would (login page).
    import http.server, json, os, sys
    if sys.argv[1:] == ["--version"]:
        print("4.96.4 0123abc with Code 1.96.4")
        sys.exit(0)
    record = {{"argv": sys.argv[1:], "password": os.environ.get("PASSWORD"), "cwd": os.getcwd(),
              "virtual_env": os.environ.get("VIRTUAL_ENV", "")}}
    with open({record!r}, "w") as f:
        json.dump(record, f)
    host, _, port = sys.argv[sys.argv.index("--bind-addr") + 1].rpartition(":")
    class Login(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"code-server login")
    http.server.HTTPServer((host, int(port)), Login).serve_forever()
    """
)


def test_code_runs_code_server_from_path_with_the_password(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "code-server.json"
    stand_in = bin_dir / "code-server"
    stand_in.write_text(CODE_SERVER_STAND_IN.format(python=sys.executable, record=str(record)))
    stand_in.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    cluster.start_coordinator()
    cluster.start_agent()
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: ide
            provider: code
            version: 4.96.4
            python: 3.11
        """,
    )
    run = submit(cluster, project, "ide")
    job = job_of(cluster, run)
    port = app_port(job)
    assert port.app == "code" and port.url_path == ""
    wait_for(lambda: record.exists() and http_get(f"http://127.0.0.1:{port.container_port}/")[0] == 200, timeout=120)
    started = json.loads(record.read_text())
    assert started["argv"] == [
        "--bind-addr",
        f"127.0.0.1:{port.container_port}",
        "--auth",
        "password",
        "--disable-telemetry",
        "--disable-update-check",
        ".",
    ]
    assert started["password"] == job.spec.env["PASSWORD"] and len(started["password"]) >= 32
    assert started["virtual_env"].endswith(".dstack-venv")  # `python: 3.11`: the job's own venv comes first
    # The login page asks for the password: the job's log says it (to whoever may read the run).
    wait_for(lambda: "code-server's password is " + started["password"] in cluster.cli("logs", run).stdout)
    cluster.cli("stop", run)
    assert cluster.wait_status(run, {"stopped", "failed", "done"}, timeout=120)["status"] == "stopped"


def test_code_without_code_server_fails_saying_how_to_provide_it(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    project = write_project(tmp_path / "p", "workflows:\n  - name: ide\n    provider: code\n")
    run = submit(cluster, project, "ide")
    info = cluster.wait_status(run, {"failed", "done", "stopped"}, timeout=120)
    assert info["status"] == "failed" and info["jobs"][0]["exit_code"] == 127
    logs = cluster.cli("logs", run)
    assert "the code provider needs code-server" in logs.stderr + logs.stdout
    assert "image: codercom/code-server" in logs.stderr + logs.stdout


# --- through the tunnel (docs/tunnels.md): what a user does after `dstack run lab` ------------------------------


def run_in_kernel(base: str, token: str, code: str) -> str:
    """What a notebook cell does: start a kernel (REST), send it the code and read its output (websocket)."""
    import websocket

    start = urllib.request.Request(
        f"{base}api/kernels?token={token}", data=b"{}", method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(start, timeout=60) as r:
        kernel = json.loads(r.read())["id"]
    ws = websocket.create_connection(f"ws://{base.removeprefix('http://')}api/kernels/{kernel}/channels?token={token}")
    ws.settimeout(60)
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "msg_type": "execute_request", "session": uuid.uuid4().hex, "username": "test"}
    content = {"code": code, "silent": False, "store_history": False, "user_expressions": {}, "allow_stdin": False}
    ws.send(
        json.dumps(
            {
                "header": header | {"version": "5.3"},
                "parent_header": {},
                "metadata": {},
                "content": content,
                "channel": "shell",
                "buffers": [],
            }
        )
    )
    out = ""
    try:
        while True:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                out += msg["content"]["text"]
            elif msg["msg_type"] == "error":
                raise AssertionError(f"the kernel failed: {msg['content']}")
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return out
    finally:
        ws.close()


def test_dstack_run_lab_prints_a_url_whose_notebook_runs_code_through_the_tunnel(
    lab_cluster: Cluster, tmp_path: Path
) -> None:
    from tests.integration.test_tunnels import Running, add_user

    cluster = lab_cluster
    alice, bob = add_user(cluster, "alice"), add_user(cluster, "bob")
    project = write_project(tmp_path / "p", "workflows:\n  - name: ide\n    provider: lab\n")
    run = Running.start(cluster, "run", "ide", cwd=project, token=alice)
    try:
        name = run.wait_line(r"(\S+) submitted").group(1)
        m = run.wait_line(r"tunnel lab: (http://127\.0\.0\.1:\d+/)(lab\?token=([\w-]+))$", timeout=120)
        base, url_path, token = m.group(1), m.group(2), m.group(3)
        port = app_port(job_of(cluster, name))
        assert url_path == port.url_path and f":{port.container_port}/" not in base  # a local port of its own

        # The printed URL opens JupyterLab (once the server listens, a moment after the job runs).
        wait_for(lambda: http_get(base + url_path)[0] == 200, timeout=120, interval=0.5, what="lab through the tunnel")
        assert http_get(f"{base}api/kernelspecs")[0] == 403  # the tunnel is no way around the token
        # A cell runs in the job: a kernel started over REST, code and output over its websocket.
        assert run_in_kernel(base, token, "import os; print(6 * 7, os.getcwd() != '')") == "42 True\n"
        # A browser opens several connections at once.
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: http_get(f"{base}api/status?token={token}")[0], range(16)))
        assert codes == [200] * 16

        # bob, a member, reads the token in the run's spec, but the tunnel is for alice and admins only.
        refused = subprocess.run(
            [sys.executable, "-m", "dstack.cli", "port-forward", name, str(port.container_port)],
            capture_output=True,
            text=True,
            env=cluster.env() | {"DSTACK_TOKEN": bob},
            cwd=project,
            timeout=60,
        )
        assert refused.returncode != 0 and "only the owner (alice) or an admin" in refused.stderr

        # It runs until stopped; then `dstack run` says so and its tunnel closes.
        assert cluster.run_info(name)["status"] == "running"
        assert cluster.cli("stop", name).returncode == 0
        run.wait_line(rf"run {name} is stopped: the tunnels are closed", timeout=120)
        run.exit_code(60)
        assert http_get(f"{base}api/status?token={token}")[0] == 0
        assert "Traceback" not in run.text()
    finally:
        run.stop()
