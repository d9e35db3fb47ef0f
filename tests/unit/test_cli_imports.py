"""What the CLI imports on its common commands: none of the server side, and nothing it does not use.

Each module kept out here was once on the path of `dstack ps` or `dstack run` (bench/cli_latency.py measures
what they cost): rich (~20 ms; cli/term.py writes the CLI's tables and lines), importlib.metadata (~10 ms;
providers' entry points are cached), yaml when no config file is read, and the server side's dependencies, which
a stray import of the coordinator, the agent or the storage would bring in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Never on the CLI's common paths: the server side and its dependencies.
SERVER_SIDE = (
    "dstack.coordinator",
    "dstack.agent",
    "dstack.storage",
    "boto3",
    "botocore",
    "docker",
    "psutil",
    "sqlite_utils",
    "sqlite3",
    "pynvml",
    "cryptography",
)
# Imported only when they are needed (a table too wide, a spinner, a progress bar; an uncached plugin lookup).
LAZY = ("rich", "importlib.metadata")


# A coordinator in the test's own process, on a Unix socket, that answers what `ps` and `run` ask (grpc and the
# protos are imported by the CLI anyway).
FAKE_COORDINATOR = """
import sys
from concurrent import futures

import grpc

from dstack.protos.v1 import client_pb2, client_pb2_grpc, common_pb2

RUN = client_pb2.Run(name="silly-frog-1", workflow="hello", status=common_pb2.RUN_STATUS_DONE)
RUN.jobs.add(job_name="hello", status=common_pb2.JOB_STATUS_DONE)


class Coordinator(client_pb2_grpc.ClientServiceServicer):
    def ListRuns(self, request, context):
        return client_pb2.ListRunsResponse(runs=[RUN])

    def HasCode(self, request, context):
        return client_pb2.HasCodeResponse(present=True)

    def SubmitRun(self, request, context):
        return client_pb2.SubmitRunResponse(run=RUN)

    def GetRun(self, request, context):
        return client_pb2.GetRunResponse(run=RUN)

    def StreamLogs(self, request, context):
        lines = [common_pb2.LogLine(seq=1, text="hello")]
        yield client_pb2.StreamLogsResponse(jobs=[client_pb2.JobLogs(job_name="hello", lines=lines)], finished_run=RUN)


server = grpc.server(futures.ThreadPoolExecutor(4))
client_pb2_grpc.add_ClientServiceServicer_to_server(Coordinator(), server)
server.add_insecure_port(ADDRESS)
server.start()
"""


def run_cli(
    home: Path, cwd: Path, argv: list[str], entry: str = "dstack.cli.main"
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Runs the CLI in a fresh interpreter, with a fake coordinator in it; returns what it printed and the
    modules it had loaded when it exited. `entry`: the module whose main() runs (the console script's is
    dstack.cli.quick, which hands what it does not take itself to dstack.cli.main's typer app)."""
    out = home / "modules.json"
    address = f"unix://{home}/coordinator.sock"
    script = "\n".join(
        [
            "import atexit, json, sys",
            f"atexit.register(lambda: open({str(out)!r}, 'w').write(json.dumps(sorted(sys.modules))))",
            f"ADDRESS = {address!r}",
            FAKE_COORDINATOR,
            f"sys.argv = {['dstack', *argv]!r}",
            f"from {entry} import main",
            "main()",
        ]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSTACK_")}
    env |= {"DSTACK_HOME": str(home), "DSTACK_COORDINATOR": address, "DSTACK_TOKEN": "t"}
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stderr)
    return r, set(json.loads(out.read_text()))


def found(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_importing_the_cli_imports_only_typer() -> None:
    script = "import json, sys\nimport dstack.cli.main\nprint(json.dumps(sorted(sys.modules)))"
    modules = set(json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, check=True).stdout))
    assert "typer" in modules
    assert found(modules, (*SERVER_SIDE, *LAZY, "yaml", "grpc", "google.protobuf", "dstack.protos")) == []


def test_ps_imports_neither_rich_nor_the_server_side(tmp_path: Path) -> None:
    r, modules = run_cli(tmp_path, tmp_path, ["ps"])
    assert "silly-frog-1" in r.stdout and "done" in r.stdout
    assert found(modules, (*SERVER_SIDE, *LAZY, "yaml")) == []


def test_run_imports_neither_rich_nor_the_server_side(tmp_path: Path) -> None:
    project = tmp_path / "p"
    (project / ".dstack").mkdir(parents=True)
    (project / ".dstack" / "workflows.yaml").write_text(
        "workflows:\n  - name: hello\n    provider: bash\n    commands: [echo hello]\n"
    )
    r, first = run_cli(tmp_path, project, ["run", "hello"])
    assert r.stdout == "hello\n" and "silly-frog-1 submitted" in r.stderr and "run silly-frog-1 done" in r.stderr
    assert found(first, (*SERVER_SIDE, "rich")) == []
    _, again = run_cli(tmp_path, project, ["run", "hello"])
    assert found(again, (*SERVER_SIDE, *LAZY)) == []  # the providers' entry points came from the cache


def test_a_configured_coordinator_is_read_without_yaml(tmp_path: Path) -> None:
    """`dstack config` writes its file as JSON (which is YAML): every command reads it without importing yaml;
    a file written by an older dstack (YAML) is still read, then with yaml."""
    script = "\n".join(
        [
            "import json, sys",
            "from dstack.cli.home import load_configured, save_config",
            "save_config('gpu-pool:50051', 't0k: \"#x', ca_file='/p/ca.pem')",
            "e = load_configured()",
            "print(json.dumps([e.address, e.token, e.ca_file, e.insecure, 'yaml' in sys.modules]))",
        ]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSTACK_")} | {"DSTACK_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert json.loads(r.stdout) == ["gpu-pool:50051", 't0k: "#x', "/p/ca.pem", False, False]
    import yaml  # what an older dstack does with the file

    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {
        "coordinator": "gpu-pool:50051",
        "token": 't0k: "#x',
        "ca_file": "/p/ca.pem",
    }
    (tmp_path / "config.yaml").write_text("coordinator: old-pool:50051\ntoken: abc\ninsecure: true\n")
    r = subprocess.run(
        [sys.executable, "-c", script.replace("save_config(", "(lambda *a, **k: None)(")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(r.stdout) == ["old-pool:50051", "abc", "", True, True]
