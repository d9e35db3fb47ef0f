"""`ports: N` (issue 13 item 3): parsing on every provider, the agent's picks, what jobs are told."""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from dstack.agent.ports import PortError, PortPool, is_free, parse_range
from dstack.agent.runner import job_env
from dstack.agent.runtimes.base import RuntimeJob
from dstack.agent.runtimes.docker import DockerOptions, DockerRuntime, container_config
from dstack.agent.runtimes.host import HostRuntime
from dstack.cli.commands.run import build_request
from dstack.cli.errors import WorkflowError
from dstack.cli.providers import load_provider
from dstack.cli.render import ports_text, run_to_json
from dstack.cli.schema import workflows_schema
from dstack.cli.workflows import load_workflows
from dstack.coordinator.model import JobUpdate
from dstack.coordinator.store import NewJob, Placement, Store
from dstack.coordinator.store.jobs import MAX_REPORTED_PORTS
from dstack.protos.v1 import client_pb2, common_pb2

JS = common_pb2.JobStatus

BODIES = {
    "bash": "    provider: bash\n    commands: [x]\n",
    "python": "    provider: python\n    file: a.py\n",
    "docker": "    provider: docker\n    image: busybox\n",
}


def spec(tmp_path: Path, text: str) -> common_pb2.JobSpec:
    (tmp_path / ".dstack").mkdir(exist_ok=True)
    (tmp_path / ".dstack" / "workflows.yaml").write_text(text)
    wf = load_workflows(tmp_path)["w"]
    return load_provider(wf.provider).job_specs(wf)[0]


@pytest.mark.parametrize("provider", sorted(BODIES))
@pytest.mark.parametrize("value, count", [("2", 2), ("0", 0), ("64", 64), ("'3'", 3)])
def test_ports_n_travels_in_the_job_spec_on_every_provider(
    tmp_path: Path, provider: str, value: str, count: int
) -> None:
    s = spec(tmp_path, f"workflows:\n  - name: w\n{BODIES[provider]}    ports: {value}\n")
    assert s.port_count == count
    assert list(s.ports) == []


def test_the_list_form_stays_as_it_was(tmp_path: Path) -> None:
    s = spec(tmp_path, "workflows:\n  - name: w\n" + BODIES["bash"] + "    ports: [8888, '8080:80']\n")
    assert [(p.host_port, p.container_port) for p in s.ports] == [(8888, 8888), (8080, 80)]
    assert s.port_count == 0


@pytest.mark.parametrize(
    "value, message",
    [
        ("-1", r"'ports' must be a number of ports to pick \(0-64\) .* got -1"),
        ("65", "'ports: 65' asks for 65 ports: give a number from 0 to 64"),
        ("8080", r"'ports: 8080' asks .* or a list such as \[8080\] for that port itself"),
        ('"x"', "'ports' must be a number of ports to pick .* got 'x'"),
        ("true", "'ports' must be a number of ports to pick .* got True"),
        ("1.5", "'ports' must be .* got 1.5"),
        ("{a: 1}", "'ports' must be"),
        ('"8080:80"', "'ports' must be .* got '8080:80'"),
    ],
)
@pytest.mark.parametrize("provider", sorted(BODIES))
def test_bad_port_counts_are_refused_at_their_line(tmp_path: Path, provider: str, value: str, message: str) -> None:
    body = BODIES[provider]
    line = 3 + body.count("\n")
    with pytest.raises(WorkflowError, match=rf"workflows.yaml:{line}:\d+: {message}"):
        spec(tmp_path, f"workflows:\n  - name: w\n{body}    ports: {value}\n")


def test_the_schema_takes_a_count_or_a_list_and_nothing_else() -> None:
    schema = workflows_schema()

    def check(ports: object) -> None:
        workflow = {"name": "w", "provider": "bash", "commands": ["x"], "ports": ports}
        jsonschema.validate({"workflows": [workflow]}, schema)

    check(2)
    check([8080, "8080:80"])
    for bad in (-1, 65, "x", True):
        with pytest.raises(jsonschema.ValidationError):
            check(bad)


# ---- the agent's picks -------------------------------------------------------------------------


def test_picks_are_free_and_held_until_the_job_ends() -> None:
    pool = PortPool()
    a = pool.reserve("a", 3)
    b = pool.reserve("b", 3)
    assert len(set(a)) == 3 and len(set(b)) == 3 and not set(a) & set(b)
    assert all(is_free(p) for p in a + b)  # nothing listens there yet: the jobs will
    pool.release("a")
    assert pool.held() == set(b)


def test_a_range_is_shared_without_overlap_and_runs_out_with_a_clear_error() -> None:
    with socket.socket() as s:  # a port in use on the host is never picked
        s.bind(("0.0.0.0", 0))
        s.listen()
        used = s.getsockname()[1]
        lo = used - 2 if used > 3000 else used
        pool = PortPool((lo, lo + 4))  # five ports, one of them in use: four to give
        free = [p for p in range(lo, lo + 5) if p != used]
        if not all(is_free(p) for p in free):
            pytest.skip("a port next to the kernel's pick is in use on this host")
        first = pool.reserve("a", 2)
        second = pool.reserve("b", 1, fixed=[free[3]])  # a list-form port is held as well
        assert used not in first + second
        assert sorted(first + second) == free[:3]
        with pytest.raises(PortError, match=rf"found only 0 free port\(s\) in its range {lo}-{lo + 4}"):
            pool.reserve("c", 1)
        assert "c" not in pool._held  # a failed reservation holds nothing
        pool.release("a")
        assert sorted(pool.reserve("c", 2)) == sorted(first)


@pytest.mark.parametrize("text", ["", "1-2", "20000", "2-1", "20000-70000", "a-b", "-5"])
def test_bad_port_ranges_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_range(text)
    assert parse_range("20000-20999") == (20000, 20999)


def test_the_job_is_told_its_ports_and_its_host_as_2022_runners_did() -> None:
    env = job_env("gpu-7", [41000, 41001])
    assert env == {
        "JOB_HOSTNAME": "gpu-7",
        "HOSTNAME": "gpu-7",
        "PORT_0": "41000",
        "JOB_PORT_0": "41000",
        "PORT_1": "41001",
        "JOB_PORT_1": "41001",
    }


def test_a_picked_port_is_published_with_the_same_number_inside_and_out(tmp_path: Path) -> None:
    job = RuntimeJob(job_id="j", workdir=tmp_path, working_dir=".", commands=["x"], env={}, ports=[(41000, 41000)])
    cfg = container_config(job, DockerOptions(network="bridge"), "img", "/a")
    assert cfg["ports"] == {"41000/tcp": 41000}


def test_what_each_runtime_reports_as_published() -> None:
    ports = [(8080, 80), (41000, 41000)]
    assert HostRuntime.published_ports(object.__new__(HostRuntime), ports) == [(80, 80), (41000, 41000)]
    bridge = object.__new__(DockerRuntime)
    bridge.opts = DockerOptions(network="bridge")
    assert bridge.published_ports(ports) == ports
    host = object.__new__(DockerRuntime)
    host.opts = DockerOptions(network="host")
    assert host.published_ports([(41000, 41000)]) == [(41000, 41000)]


# ---- the coordinator's record ------------------------------------------------------------------


def test_the_ports_an_agent_reports_are_recorded_bounded_and_only_real_port_numbers(tmp_path: Path) -> None:
    """A broken or hostile agent reports port 0, 70000 and thousands of ports with RUNNING: only real
    port numbers are kept, at most MAX_REPORTED_PORTS of them; a later report (DONE) keeps the record."""
    s = Store(tmp_path / "db.sqlite")
    spec = common_pb2.JobSpec(job_name="a", commands=["true"], port_count=2).SerializeToString()
    name = s.create_run("admin", "wf", b"", "", [], [NewJob("a", spec, 0, 0, 0, [])]).name
    run = s.run_by_name(name)
    jid = s.jobs_of_runs([run.id])[run.id][0].id
    agent_id = s.register_agent("h", "tok", b"")
    s.apply_schedule([Placement(jid, agent_id, [])], {}, [])
    flood = [(0, 80), (41000, 41000), (70000, 1), (41001, 8080)] + [(1024 + i, 1024 + i) for i in range(5000)]
    s.apply_job_updates(agent_id, [JobUpdate(job_id=jid, status=JS.JOB_STATUS_RUNNING, ports=flood)])
    row = s.jobs_of_runs([run.id])[run.id][0]
    assert row.ports[:2] == ((41000, 41000), (41001, 8080))
    assert len(row.ports) == MAX_REPORTED_PORTS
    s.apply_job_updates(agent_id, [JobUpdate(job_id=jid, status=JS.JOB_STATUS_DONE)])
    assert s.jobs_of_runs([run.id])[run.id][0].ports[:2] == ((41000, 41000), (41001, 8080))


def test_ps_json_and_the_table_show_the_recorded_ports() -> None:
    job = client_pb2.Job(job_name="a", status=JS.JOB_STATUS_RUNNING)
    job.ports.add(host_port=41000, container_port=41000)
    job.ports.add(host_port=41001, container_port=80)
    run = client_pb2.Run(name="r", jobs=[job])
    jobs = run_to_json(run)["jobs"]
    assert isinstance(jobs, list) and jobs[0]["ports"] == [
        {"container": 41000, "host": 41000},
        {"container": 80, "host": 41001},
    ]
    assert ports_text(run) == "ports 41000, 41001->80"
    job.status = JS.JOB_STATUS_DONE  # the table shows them only while the job runs
    assert ports_text(client_pb2.Run(name="r", jobs=[job])) == ""


# ---- `dstack run WORKFLOW -p N` ------------------------------------------------------------------


def _project(tmp_path: Path) -> Path:
    (tmp_path / ".dstack").mkdir(exist_ok=True)
    (tmp_path / "a.py").write_text("print(1)\n")
    (tmp_path / ".dstack" / "workflows.yaml").write_text(
        "workflows:\n"
        "  - name: app\n    provider: bash\n    ports: [8080]\n    commands: [x]\n"
        "  - name: script\n    provider: python\n    file: a.py\n"
    )
    return tmp_path


@pytest.mark.parametrize("args", [["-p", "3"], ["--ports", "3"], ["--ports=3"]])
def test_run_p_n_asks_a_bash_workflow_for_n_ports_in_place_of_its_own(tmp_path: Path, args: list[str]) -> None:
    job = build_request(_project(tmp_path), "app", args).submit.jobs[0]
    assert job.port_count == 3 and list(job.ports) == []


def test_run_p_is_left_to_a_python_script_and_after_the_separator(tmp_path: Path) -> None:
    root = _project(tmp_path)
    job = build_request(root, "script", ["-p", "3"]).submit.jobs[0]
    assert job.port_count == 0 and job.commands[-1].endswith("a.py -p 3")
    with pytest.raises(WorkflowError, match="takes no arguments"):
        build_request(root, "app", ["--", "-p", "3"])  # after `--`: the workflow's, and a bash one takes none


@pytest.mark.parametrize("args", [["-p"], ["-p", "x"], ["--ports=65"], ["-p", "-1"]])
def test_run_p_with_a_bad_count_is_refused(tmp_path: Path, args: list[str]) -> None:
    with pytest.raises(WorkflowError, match="number of ports"):
        build_request(_project(tmp_path), "app", args)


# ---- the real 2022 files -----------------------------------------------------------------------

CORPUS = Path(__file__).resolve().parents[1] / "corpus2022"


def _corpus_report() -> Any:
    loaded = importlib.util.spec_from_file_location("corpus2022_report_ports", CORPUS / "report.py")
    assert loaded and loaded.loader
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def test_every_corpus_file_with_ports_n_is_accepted() -> None:
    """tests/corpus2022: dstack-examples' apps (`ports: 1` for uvicorn on $PORT_0) and TRecover's train
    (bash `python` + `ports: 1`), refused before this item for `ports` alone."""
    report = _corpus_report()
    entries = json.loads((CORPUS / "sources.json").read_text())
    with_ports = [e for e in entries if "3" in {item for item, _ in report.forms(e)}]
    assert len(with_ports) >= 6
    for entry in with_ports:
        result = report.check_file(entry)
        assert not result["file_error"] and not any(result["workflows"].values()), (entry["file"], result)
