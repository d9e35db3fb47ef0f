"""Absolute artifact paths (issue 13 item 4): one set of rules (protos/container_paths.py) checked by the CLI
(file:line errors), the coordinator (what it records and where it keeps it) and the agent, which trusts
nothing it receives: a hostile path never names a folder on the host."""

from __future__ import annotations

from pathlib import Path

import pytest

from dstack.agent.artifacts import (
    ArtifactError,
    collect_files,
    input_destination,
    make_container_folders,
    plan_container_folders,
    prepare_dirs,
)
from dstack.agent.runtimes.base import RuntimeJob
from dstack.agent.runtimes.docker import DockerOptions, container_config
from dstack.cli.commands.artifacts import _local, _selected
from dstack.cli.errors import WorkflowError
from dstack.cli.workflows import load_workflows
from dstack.coordinator.app.runs import needing_container
from dstack.coordinator.artifacts import artifact_key, check_job_artifact_path, check_relative_path
from dstack.coordinator.convert import job_spec_from_proto
from dstack.coordinator.errors import InvalidRequest
from dstack.coordinator.model import JobSpec
from dstack.protos.container_paths import BadContainerPath, check_container_path, check_disjoint
from dstack.protos.v1 import agent_pb2, common_pb2

HOSTILE = [
    "/",
    "//",
    "/.",
    "/proc",
    "/proc/self",
    "/proc/self/root",
    "/sys/fs/cgroup",
    "/dev/shm",
    "/etc",
    "/etc/passwd",
    "/../../etc",
    "/opt/../../etc",
    "/opt/envs/..",
    "/workflow",
    "/workflow/out",
    "/var/lib",  # holds dstack's environment cache mount
    "/var/lib/dstack/envs",
    "/usr",
    "/bin",
    "/opt/\x00x",
]


@pytest.mark.parametrize("path", HOSTILE)
def test_the_shared_rules_refuse_paths_that_are_not_a_folder_of_the_job(path: str) -> None:
    with pytest.raises(BadContainerPath):
        check_container_path(path)


@pytest.mark.parametrize(
    ("path", "norm"),
    [
        ("/opt/conda/envs/myenv", "/opt/conda/envs/myenv"),
        ("/root/.cache/huggingface/hub", "/root/.cache/huggingface/hub"),
        ("//opt/./envs//myenv/", "/opt/envs/myenv"),
        ("/workflows", "/workflows"),  # a sibling of the code mount, not inside it
        ("/usr/local/share/models", "/usr/local/share/models"),
    ],
)
def test_the_shared_rules_accept_and_normalise_folders(path: str, norm: str) -> None:
    assert check_container_path(path) == norm


def test_two_absolute_artifacts_may_not_overlap() -> None:
    check_disjoint(["/opt/a", "/opt/ab", "/srv/x"])
    with pytest.raises(BadContainerPath, match="overlap"):
        check_disjoint(["/opt/envs", "/opt/envs/myenv"])
    with pytest.raises(BadContainerPath, match="overlap"):
        check_disjoint(["/opt/envs", "/opt/envs"])


# ---- the CLI: file:line errors, and the job needs a container ------------------------------------------------


def _load(tmp_path: Path, artifacts: str) -> dict[str, object]:
    (tmp_path / ".dstack").mkdir(exist_ok=True)
    (tmp_path / ".dstack" / "workflows.yaml").write_text(
        f"workflows:\n  - name: t\n    provider: bash\n    commands: [x]\n    artifacts:\n{artifacts}"
    )
    return dict(load_workflows(tmp_path))


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("      - /\n", "is the whole container"),
        ("      - /proc/self\n", "is inside /proc"),
        ("      - path: /../../etc\n", "contains '..'"),
        ("      - /workflow\n", "overlaps /workflow"),
        ("      - /workflow/out\n", "overlaps /workflow"),
        ("      - /etc/ssl\n", "is inside /etc"),
    ],
)
def test_the_cli_refuses_them_at_their_line(tmp_path: Path, item: str, message: str) -> None:
    with pytest.raises(WorkflowError, match=r"workflows.yaml:6:\d+: .*" + message):
        _load(tmp_path, item)


def test_the_cli_refuses_overlapping_absolute_artifacts(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match=r"workflows.yaml:7:\d+: artifact paths '/opt/e' and '/opt/e/x' overlap"):
        _load(tmp_path, "      - /opt/e\n      - /opt/e/x\n")


def test_an_absolute_artifact_makes_the_job_need_a_container(tmp_path: Path) -> None:
    from dstack.cli.commands.run import build_request

    (tmp_path / ".dstack").mkdir()
    (tmp_path / ".dstack" / "workflows.yaml").write_text(
        "workflows:\n"
        "  - name: setup\n    provider: bash\n    commands: [x]\n    artifacts:\n      - path: //opt/envs/./myenv\n"
        "  - name: use\n    provider: bash\n    commands: [x]\n    deps:\n      - workflow: setup\n"
        "  - name: both\n    provider: bash\n    commands: [x]\n    depends-on: [setup]\n    artifacts: [out]\n"
        "  - name: plain\n    provider: bash\n    commands: [x]\n    artifacts: [out]\n"
    )
    setup = build_request(tmp_path, "setup", []).submit.jobs[0]
    assert setup.needs_container and [a.path for a in setup.artifacts] == ["/opt/envs/myenv"]
    assert not build_request(tmp_path, "plain", []).submit.jobs[0].needs_container
    use = build_request(tmp_path, "use", [])
    assert [(n.job_name, n.why) for n in use.container_needs] == [
        ("use", "workflow 'use' mounts /opt/envs/myenv, saved by 'setup'")
    ]
    assert use.container_needs[0].location.line == 11
    both = build_request(tmp_path, "both", [])
    assert [n.job_name for n in both.container_needs] == ["setup", "both"]
    assert [n.job_name for n in build_request(tmp_path, "plain", []).container_needs] == []


# ---- the coordinator: what it records, where it keeps it, which jobs wait for containers ----------------------


def test_the_coordinator_records_absolute_paths_apart_from_relative_ones() -> None:
    assert check_job_artifact_path("/opt/envs/myenv/bin/python") == "/opt/envs/myenv/bin/python"
    assert artifact_key("r", "j", "/opt/x") == "runs/r/j/rootfs/opt/x"
    assert artifact_key("r", "j", "opt/x") == "runs/r/j/artifacts/opt/x"
    for hostile in ["/proc/self/environ", "/../../etc/passwd", "/opt/../etc/x", "//opt/x", "/workflow/a"]:
        with pytest.raises(InvalidRequest):
            check_job_artifact_path(hostile)
    with pytest.raises(InvalidRequest):  # `dstack artifacts upload` stays relative
        check_relative_path("/opt/x")


def _spec(name: str, artifacts: tuple[str, ...] = (), depends_on: tuple[str, ...] = ()) -> JobSpec:
    return job_spec_from_proto(
        common_pb2.JobSpec(
            job_name=name,
            artifacts=[common_pb2.ArtifactSpec(path=p) for p in artifacts],
            depends_on=depends_on,
        )
    )


def test_jobs_that_save_or_receive_absolute_artifacts_need_a_container() -> None:
    setup = _spec("setup", ("/opt/envs/myenv",))
    use = _spec("use", depends_on=("setup",))
    plain = _spec("plain", ("out",))
    jobs = [setup, use, plain]
    none: dict[str, tuple[str, ...]] = {"run-1": (), "run-2": ("/opt/envs/myenv",)}
    assert needing_container(setup, jobs, [], none.__getitem__).needs_container
    marked = needing_container(use, jobs, [], none.__getitem__)
    assert marked.needs_container and common_pb2.JobSpec.FromString(marked.encoded).needs_container
    assert not needing_container(plain, jobs, ["run-1"], none.__getitem__).needs_container
    assert needing_container(plain, jobs, ["run-2"], none.__getitem__).needs_container


# ---- the agent: it trusts nothing it receives ---------------------------------------------------------------


def _input(files: list[str], mounts: list[str]) -> agent_pb2.ArtifactInput:
    return agent_pb2.ArtifactInput(
        run_name="r",
        job_name="setup",
        files=[common_pb2.ArtifactFile(path=p, size=1, sha256="0" * 64) for p in files],
        mount_paths=mounts,
    )


@pytest.mark.parametrize("path", HOSTILE)
def test_the_agent_refuses_a_hostile_spec_before_it_creates_anything(tmp_path: Path, path: str) -> None:
    base = tmp_path / "job.mounts"
    with pytest.raises(ArtifactError):
        plan_container_folders(base, [common_pb2.ArtifactSpec(path=path)], [])
    with pytest.raises(ArtifactError):
        plan_container_folders(base, [], [_input([], [path])])
    assert not base.exists()


def test_the_agent_names_host_folders_by_position_under_the_jobs_own_folder(tmp_path: Path) -> None:
    base = tmp_path / "job.mounts"
    specs = [common_pb2.ArtifactSpec(path="/opt/envs/myenv"), common_pb2.ArtifactSpec(path="out")]
    folders = plan_container_folders(base, specs, [_input([], ["/root/.cache/hub", "/opt/envs/myenv"])])
    assert folders == {"/opt/envs/myenv": base / "0", "/root/.cache/hub": base / "1"}
    with pytest.raises(ArtifactError, match="overlap"):
        plan_container_folders(base, specs, [_input([], ["/opt/envs"])])
    make_container_folders(folders)
    assert sorted(p.name for p in base.iterdir()) == ["0", "1"]
    prepare_dirs(tmp_path / "code", specs)  # relative ones only: nothing named /opt is made
    assert (tmp_path / "code" / "out").is_dir() and not (tmp_path / "code" / "opt").exists()


def test_an_input_file_goes_only_into_the_folder_its_producer_declared(tmp_path: Path) -> None:
    work, base = tmp_path / "code", tmp_path / "job.mounts"
    folders = plan_container_folders(base, [], [_input([], ["/opt/envs/myenv"])])
    good = _input(["/opt/envs/myenv/bin/python", "data/x"], ["/opt/envs/myenv"])
    assert input_destination(good, good.files[0], work, folders) == base / "0" / "bin" / "python"
    assert input_destination(good, good.files[1], work, folders) == (work / "data" / "x").resolve()
    for hostile in ["/opt/envs/myenv/../../../etc/passwd", "/etc/passwd", "/opt/envs/other/x", "//opt/envs/myenv/x"]:
        src = _input([hostile], ["/opt/envs/myenv"])
        with pytest.raises(ArtifactError):
            input_destination(src, src.files[0], work, folders)
    undeclared = _input(["/opt/envs/myenv/x"], [])  # the producer never declared that folder
    with pytest.raises(ArtifactError):
        input_destination(undeclared, undeclared.files[0], work, folders)


def test_saving_a_host_folder_does_not_follow_a_symlink_the_job_left(tmp_path: Path) -> None:
    folder = tmp_path / "0"
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "python").write_text("x")
    (folder / "etc").symlink_to("/etc")
    files = collect_files(folder, [common_pb2.ArtifactSpec(path=".")])
    assert [rel for rel, _ in files] == ["bin/python"]


def test_the_container_mounts_each_folder_at_its_path() -> None:
    job = RuntimeJob(
        job_id="j", workdir=Path("/agent/jobs/j"), working_dir=".", commands=["x"], env={},
        mounts=[("/agent/jobs/j.mounts/0", "/opt/envs/myenv")],
    )  # fmt: skip
    volumes = container_config(job, DockerOptions(), "img", "/agent")["volumes"]
    assert volumes["/agent/jobs/j.mounts/0"] == {"bind": "/opt/envs/myenv", "mode": "rw"}
    assert volumes["/agent/jobs/j"]["bind"] == "/workflow"
    hostile = RuntimeJob(job_id="j", workdir=Path("/w"), working_dir=".", commands=[], env={}, mounts=[("/x", "/proc")])
    with pytest.raises(BadContainerPath):
        container_config(hostile, DockerOptions(), "img", "/agent")


def test_downloads_write_absolute_paths_under_the_output_folder() -> None:
    assert _local("/opt/envs/myenv/bin/python") == "opt/envs/myenv/bin/python"
    assert _local("out/model.bin") == "out/model.bin"
    assert _selected("/opt/envs/myenv/x", "/opt/envs") and _selected("/opt/envs/myenv/x", "opt/envs/myenv")
    assert not _selected("/opt/envs/myenv/x", "/opt/env")
