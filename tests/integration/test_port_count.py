"""`ports: N` end to end (issue 13 item 3): a real coordinator, agents and CLI; the job's own servers
on the ports its agent picked, fetched from the job itself and from the host through what
`dstack ps --json` recorded."""

from __future__ import annotations

import random
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import PY, Cluster, JobJSON, search, wait_for, write_project
from tests.dockerd import Dockerd
from tests.integration.test_docker import docker_agent

pytestmark = pytest.mark.integration

# Serves `name` on each port given, on every address, until the job is stopped.
SERVER = """
import http.server, sys, threading

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (sys.argv[1] + " " + str(self.server.server_address[1])).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

servers = [http.server.ThreadingHTTPServer(("0.0.0.0", int(p)), Handler) for p in sys.argv[2:]]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("serving on", *sys.argv[2:], flush=True)
servers[0].serve_forever()
"""

# Fetches a URL, retrying while the server starts.
FETCH = """
import sys, time, urllib.request
for _ in range(600):
    try:
        print("self:", urllib.request.urlopen(sys.argv[1], timeout=5).read().decode(), flush=True)
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("never answered: " + sys.argv[1])
"""

ENV_NAMES = "PORT_0 PORT_1 JOB_PORT_0 JOB_PORT_1 JOB_HOSTNAME HOSTNAME JOB_ID RUN_NAME PYTHONUNBUFFERED"


def serving_project(root: Path, count: int, name: str = "serve", extra: str = "") -> Path:
    ports = " ".join(f"$PORT_{i}" for i in range(count))
    return write_project(
        root,
        f"""
        workflows:
          - name: {name}
            provider: bash
            ports: {count}{extra}
            commands:
              - for v in {ENV_NAMES}; do echo "env $v=$(printenv $v)"; done
              - python3 server.py {name} {ports} &
              - python3 fetch.py http://127.0.0.1:$PORT_0/
              - wait
        """,
        {"server.py": SERVER, "fetch.py": FETCH},
    )


def submit(cluster: Cluster, project: Path, workflow: str) -> str:
    r = cluster.cli("run", "-d", workflow, cwd=project)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def running_job(cluster: Cluster, run: str) -> JobJSON:
    """The run's job once it runs and its agent reported its ports."""

    def ready() -> JobJSON | None:
        info = cluster.run_info(run)
        job = info["jobs"][0]
        assert info["status"] not in ("failed", "stopped", "done"), job
        return job if job["status"] == "running" and job["ports"] else None

    return wait_for(ready, timeout=120, interval=0.3, what=f"run {run} running with its ports")


def fetch(port: int) -> str:
    def answer() -> str | None:
        try:
            return str(urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode())
        except OSError:
            return None

    return wait_for(answer, timeout=60, interval=0.2, what=f"an answer on port {port}")


def logs_with(cluster: Cluster, run: str, text: str) -> str:
    """The run's logs once they hold `text`."""

    def check() -> str | None:
        out = cluster.cli("logs", run).stdout
        return out if text in out else None

    return wait_for(check, timeout=60, interval=0.3, what=f"{text!r} in the logs of {run}")


def stop(cluster: Cluster, *runs: str) -> None:
    for run in runs:
        assert cluster.cli("stop", run).returncode == 0
    for run in runs:
        cluster.wait_status(run, {"stopped"}, timeout=60)


def test_a_job_serves_on_its_two_ports_reached_from_itself_and_the_host(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    # The workflow's own PORT_0 cannot point the job (or whoever trusts $PORT_0) at another port.
    project = serving_project(tmp_path / "p", 2, extra="\n            environment: {PORT_0: '22', JOB_PORT_1: '1'}")
    run = submit(cluster, project, "serve")
    job = running_job(cluster, run)
    ports = [p["host"] for p in job["ports"]]
    assert len(set(ports)) == 2 and all(p["container"] == p["host"] for p in job["ports"])  # host processes
    assert fetch(ports[0]) == f"serve {ports[0]}"
    assert fetch(ports[1]) == f"serve {ports[1]}"
    text = logs_with(cluster, run, "self:")
    assert f"self: serve {ports[0]}" in text  # the job reaches its own $PORT_0
    for i, port in enumerate(ports):
        assert f"env PORT_{i}={port}" in text and f"env JOB_PORT_{i}={port}" in text
    assert f"env JOB_HOSTNAME={socket.gethostname()}" in text and f"env HOSTNAME={socket.gethostname()}" in text
    assert f"env RUN_NAME={run}" in text and "env PYTHONUNBUFFERED=1" in text
    assert search(r"env JOB_ID=\S+", text)
    ps = subprocess.run(
        [PY, "-m", "dstack.cli", "ps"], capture_output=True, text=True, env=cluster.env() | {"COLUMNS": "400"}
    )
    assert f"ports {ports[0]}, {ports[1]}" in ps.stdout, ps.stdout
    stop(cluster, run)


def test_jobs_on_one_agent_never_share_a_port_and_one_that_finds_none_fails(cluster: Cluster, tmp_path: Path) -> None:
    """The agent's range holds four ports: two jobs of two each take them all (the reservation, not
    only the bind test, keeps them apart: neither job listens when the other's ports are picked), a
    third finds none and fails saying so, and a fourth gets ports again once the first has ended."""
    first = _free_run(4)
    cluster.start_coordinator()
    cluster.start_agent("agent-1", "--job-ports", f"{first}-{first + 3}")
    a = submit(cluster, serving_project(tmp_path / "a", 2, "a"), "a")
    b = submit(cluster, serving_project(tmp_path / "b", 2, "b"), "b")
    ports_a = [p["host"] for p in running_job(cluster, a)["ports"]]
    ports_b = [p["host"] for p in running_job(cluster, b)["ports"]]
    assert not set(ports_a) & set(ports_b)
    assert sorted(ports_a + ports_b) == list(range(first, first + 4))
    assert fetch(ports_a[1]) == f"a {ports_a[1]}" and fetch(ports_b[1]) == f"b {ports_b[1]}"

    c = submit(cluster, serving_project(tmp_path / "c", 1, "c"), "c")
    failed = cluster.wait_status(c, {"failed"}, timeout=120)
    assert failed["jobs"][0]["termination_reason"] == "executor error"
    assert f"found only 0 free port(s) in its range {first}-{first + 3}" in (failed["jobs"][0]["message"] or "")

    stop(cluster, a)
    d = submit(cluster, serving_project(tmp_path / "d", 2, "d"), "d")
    assert sorted(p["host"] for p in running_job(cluster, d)["ports"]) == sorted(ports_a)
    stop(cluster, b, d)


def test_in_a_container_the_picked_port_is_reached_from_the_host(
    cluster: Cluster, dockerd: Dockerd, tmp_path: Path
) -> None:
    """The tests' dockerd has no bridge: containers share the host's network, where the picked port is
    the host's; the job serves with the image's busybox httpd on $PORT_0 and fetches it itself."""
    cluster.start_coordinator()
    docker_agent(cluster, dockerd, "agent-1", "--docker-network", "host")
    project = write_project(
        tmp_path / "p",
        """
        workflows:
          - name: web
            provider: bash
            ports: 1
            commands:
              - mkdir -p www && echo "from the container" > www/index.html
              - echo "env PORT_0=$PORT_0 JOB_PORT_0=$JOB_PORT_0"
              - httpd -f -p 0.0.0.0:$PORT_0 -h www &
              - until wget -q -O - http://127.0.0.1:$PORT_0/ > self.txt; do sleep 0.1; done
              - 'echo "self: $(cat self.txt)"'
              - wait
        """,
    )
    run = submit(cluster, project, "web")
    job = running_job(cluster, run)
    [port] = job["ports"]
    assert port["host"] == port["container"]
    assert fetch(port["host"]) == "from the container\n"
    text = logs_with(cluster, run, "self:")
    assert "self: from the container" in text
    assert f"env PORT_0={port['host']} JOB_PORT_0={port['host']}" in text
    stop(cluster, run)


def _free_run(n: int) -> int:
    """The first of n consecutive ports nothing on this host listens on now."""

    def free(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
                return True
            except OSError:
                return False

    for _ in range(200):  # outside the kernel's ephemeral range, where other tests' servers listen
        start = random.randrange(20000, 32000 - n)
        if all(free(p) for p in range(start, start + n)):
            return start
    raise AssertionError("no run of free ports")
