from __future__ import annotations

from pathlib import Path

import pytest

from dstack.cli.errors import WorkflowError
from dstack.cli.spec import Workflow
from dstack.cli.workflows import load_workflows


def load(tmp_path: Path, text: str) -> dict[str, Workflow]:
    (tmp_path / ".dstack").mkdir(exist_ok=True)
    (tmp_path / ".dstack" / "workflows.yaml").write_text(text)
    return load_workflows(tmp_path)


def test_resources_parse(tmp_path: Path) -> None:
    wfs = load(
        tmp_path,
        "workflows:\n  - name: t\n    provider: bash\n    commands: [x]\n    resources:\n"
        "      gpu: {count: 2, name: A100, memory: 40GB}\n      cpu: 4\n      memory: 64GB\n      shm_size: 1GiB\n",
    )
    r = wfs["t"].resources
    assert (r.gpu.count, r.gpu.name, r.gpu.memory_bytes) == (2, "A100", 40 * 10**9)  # GB is decimal, as in 2022
    assert r.cpu == 4 and r.memory_bytes == 64 * 10**9 and r.shm_size_bytes == 1 << 30


@pytest.mark.parametrize("gpu", ["-1", "1.5", "lots", "true"])
def test_bad_gpu_values(tmp_path: Path, gpu: str) -> None:
    with pytest.raises(WorkflowError, match=r"workflows.yaml:6:\d+: 'gpu' must"):
        load(
            tmp_path,
            f"workflows:\n  - name: t\n    provider: bash\n    commands: [x]\n    resources:\n      gpu: {gpu}\n",
        )


def test_python_version_keeps_its_text(tmp_path: Path) -> None:
    wfs = load(tmp_path, "workflows:\n  - name: t\n    provider: python\n    file: a.py\n    version: 3.10\n")
    from dstack.cli.providers import load_provider

    spec = load_provider("python").job_specs(wfs["t"])[0]
    assert "python3.10" in "\n".join(spec.commands)
    assert spec.python_version == "3.10" and spec.image == ""  # the agent picks the image for the version


def test_args_string_or_list(tmp_path: Path) -> None:
    wfs = load(
        tmp_path,
        "workflows:\n  - name: s\n    provider: python\n    file: a.py\n    args: --lr 0.1\n"
        "  - name: l\n    provider: python\n    file: a.py\n    args: [--name, two words]\n",
    )
    from dstack.cli.providers import load_provider

    p = load_provider("python")
    assert p.job_specs(wfs["s"])[0].commands[-1] == "exec $PYTHON a.py --lr 0.1"
    assert p.job_specs(wfs["l"])[0].commands[-1] == "exec $PYTHON a.py --name 'two words'"


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("    help: 2024-13-45\n", "invalid value '2024-13-45'"),
        ("    resources:\n      memory: 99999PB\n", "too large"),
        ("    resources:\n      gpu: {count: .inf}\n", "'count' must be a whole number"),
        ("    resources:\n      gpu: 5000000000\n", "at most 1024"),
        ("    resources:\n      cpu: .nan\n", "'cpu' must be between"),
        ('    depends-on: ["download:"]\n', "invalid dependency"),
    ],
)
def test_values_out_of_range_are_workflow_errors(tmp_path: Path, line: str, needle: str) -> None:
    with pytest.raises(WorkflowError, match=r"workflows.yaml:\d+:\d+: ") as info:
        load(tmp_path, "workflows:\n  - name: t\n    provider: bash\n    commands: [x]\n" + line)
    assert needle in str(info.value)


def test_list_items_keep_their_text(tmp_path: Path) -> None:
    wfs = load(tmp_path, "workflows:\n  - name: t\n    provider: bash\n    commands: [true, 3.10, yes]\n")
    from dstack.cli.providers import load_provider

    assert list(load_provider("bash").job_specs(wfs["t"])[0].commands) == ["true", "3.10", "yes"]


def test_values_keep_their_text_in_env_image_and_ports(tmp_path: Path) -> None:
    wfs = load(
        tmp_path,
        "workflows:\n  - name: t\n    provider: bash\n    commands: [x]\n    image: 3.10\n"
        "    environment: {PY: 3.10, F: yes, ID: 0123}\n    ports: [22:22, 8080]\n",
    )
    wf = wfs["t"]
    assert wf.env == {"PY": "3.10", "F": "yes", "ID": "0123"}
    assert wf.image == "3.10"
    assert wf.ports == [(22, 22), (8080, 8080)]


@pytest.mark.parametrize(
    ("variables", "needle"),
    [
        ("variables:\n  global:\n    path: data/train.csv\n", "would set the job's PATH"),
        (
            "variables:\n  global:\n    batch-size: 1\n    batch_size: 2\n",
            "both become the environment variable BATCH_SIZE",
        ),
    ],
)
def test_variables_that_would_break_the_job(tmp_path: Path, variables: str, needle: str) -> None:
    from dstack.cli.variables import load_variables

    (tmp_path / ".dstack").mkdir()
    (tmp_path / ".dstack" / "variables.yaml").write_text(variables)
    with pytest.raises(WorkflowError, match=r"variables.yaml:\d+:\d+: ") as info:
        load_variables(tmp_path, "t")
    assert needle in str(info.value)


def test_duplicate_input_paths_are_refused() -> None:
    import asyncio

    import grpc

    from dstack.agent.artifacts import ArtifactError, Downloader
    from dstack.agent.retry import RetryPolicy
    from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, common_pb2
    from dstack.storage.transfer import Transfer

    f = common_pb2.ArtifactFile(path="data/x", size=1, sha256="0" * 64)
    inputs = [agent_pb2.ArtifactInput(run_name=r, job_name="download", files=[f]) for r in ("run-1", "run-2")]

    async def fetch() -> None:
        # Refused before anything is asked of the coordinator (nothing listens there) or of the store.
        async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
            with Transfer() as transfer:
                await Downloader(agent_pb2_grpc.AgentServiceStub(channel), list, RetryPolicy(), transfer).fetch(
                    inputs, Path("/nonexistent")
                )

    with pytest.raises(ArtifactError, match="data/x is an artifact of both run-1/download and run-2/download"):
        asyncio.run(fetch())
