"""The Python SDK (dstack.api) against a real coordinator and agent: what a notebook or a pipeline does."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dstack.api import (
    AuthError,
    Client,
    CoordinatorUnreachable,
    NotFoundError,
    RunFailed,
    RunStatus,
    TlsMismatch,
    WaitTimeout,
    WorkflowError,
)
from tests.conftest import Cluster, free_port, write_project

pytestmark = pytest.mark.integration

WORKFLOWS = """
workflows:
  - name: train
    help: Writes a model
    provider: bash
    commands:
      - echo "epochs=$EPOCHS args=${{ run.args }}"
      - mkdir -p out/sub && echo "weights $EPOCHS" > out/model.txt && echo deep > out/sub/deep.txt
      - for i in 1 2 3; do echo "line $i"; done
    artifacts: [out]
  - name: broken
    provider: bash
    commands: ["echo about to fail", "exit 3"]
  - name: long
    provider: bash
    commands: ["echo started", "sleep 600"]
  - name: noop
    provider: bash
    commands: ["true"]
"""
VARIABLES = "variables:\n  train:\n    epochs: 1\n"


def project(tmp_path: Path) -> Path:
    return write_project(tmp_path / "proj", WORKFLOWS, {".dstack/variables.yaml": VARIABLES})


def sdk(cluster: Cluster, token: str | None = None, timeout: float = 30.0) -> Client:
    token = cluster.admin_token if token is None else token
    return Client(address=cluster.address, token=token, ca_file=cluster.ca_file, timeout=timeout)


def test_submit_wait_logs_artifacts_list(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    root = project(tmp_path)
    with sdk(cluster) as client:
        run = client.runs.submit("train", args=["a b", "c"], repo=root / ".dstack", variables={"epochs": 7})
        assert run.workflow == "train"
        followed = list(run.logs(follow=True))
        assert followed == ["epochs=7 args='a b' c", "line 1", "line 2", "line 3"]
        assert run.wait(timeout=120, check=True) is RunStatus.DONE
        assert list(run.logs()) == followed  # read again once it is over, from storage
        files = {a.path: a for a in run.artifacts.list()}
        assert {"out/model.txt", "out/sub/deep.txt"} <= set(files)
        got = run.artifacts.download(to=tmp_path / "dl")
        assert (tmp_path / "dl" / "out" / "model.txt").read_text() == "weights 7\n"
        assert tmp_path / "dl" / "out" / "sub" / "deep.txt" in got
        only = run.artifacts.download("out/sub", to=tmp_path / "dl2")
        assert [p.relative_to(tmp_path / "dl2").as_posix() for p in only] == ["out/sub/deep.txt"]
        with pytest.raises(NotFoundError, match="no artifact at 'nothing-here'"):
            run.artifacts.download("nothing-here", to=tmp_path / "dl3")
        assert client.runs.get(run.name).status is RunStatus.DONE
        assert run.name in [r.name for r in client.runs.list(all=True, workflow="train", status="done")]
        assert client.runs.list(workflow="broken") == []
    # What `dstack ps` shows of it: the same run, submitted as the CLI would have.
    info = cluster.run_info(run.name)
    assert info["status"] == "done" and info["workflow"] == "train"


def test_config_from_the_cli_environment(cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Client() reads what the CLI reads (here DSTACK_COORDINATOR, DSTACK_TOKEN, DSTACK_CA_FILE)."""
    cluster.start_coordinator()
    cluster.start_agent()
    for k, v in cluster.env().items():
        monkeypatch.setenv(k, v)
    with Client() as client:
        assert client.address == cluster.address and not client.local
        run = client.runs.submit("noop", repo=project(tmp_path))
        assert run.wait(timeout=120) is RunStatus.DONE


def test_failing_run_returns_or_raises(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    with sdk(cluster) as client:
        run = client.runs.submit("broken", repo=project(tmp_path))
        assert run.wait(timeout=120) is RunStatus.FAILED  # returned, as documented
        assert "about to fail" in list(run.logs())
        with pytest.raises(RunFailed, match=rf"run {run.name} failed.*dstack logs {run.name}") as e:
            run.wait(check=True)
        assert e.value.status == "failed" and e.value.run_name == run.name
        many = client.runs.submit_many("broken", [[], []], repo=project(tmp_path))
        with pytest.raises(RunFailed):
            client.runs.wait(many, timeout=120, check=True)


def test_stop_and_wait_timeout(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent()
    with sdk(cluster) as client:
        run = client.runs.submit("long", repo=project(tmp_path))
        assert next(run.logs(follow=True)) == "started"  # the first line arrives while it runs
        with pytest.raises(WaitTimeout, match=rf"run {run.name} is still running after 0.5 s"):
            run.wait(timeout=0.5)
        assert run.stop() is RunStatus.STOPPED
        assert client.runs.get(run.name).status is RunStatus.STOPPED


def test_errors_are_typed_and_say_what_to_do(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    root = project(tmp_path)
    with sdk(cluster) as client:
        listed = r"workflow 'nope' is not defined.*workflows: broken, long, noop, train"
        with pytest.raises(NotFoundError, match=listed):
            client.runs.submit("nope", repo=root)
        with pytest.raises(WorkflowError, match="'--epoch' is not a variable of workflow 'train'; did you mean"):
            client.runs.submit("train", repo=root, variables={"epoch": 3})
        with pytest.raises(NotFoundError):
            client.runs.get("no-such-run-1")
        assert client.runs.list(all=True) == []  # nothing was submitted by the refused calls
    with sdk(cluster, token="not-the-token") as bad, pytest.raises(AuthError):
        bad.runs.list()
    # No token at all: refused before any code is taken in.
    with sdk(cluster, token="") as empty, pytest.raises(AuthError):
        empty.runs.submit("noop", repo=root)
    # Nothing listens there: a typed error that names the address, at once.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with Client(address=f"127.0.0.1:{port}", token="t", ca_file=cluster.ca_file, timeout=5) as gone:
            t0 = time.monotonic()
            with pytest.raises(CoordinatorUnreachable, match=f"cannot reach the coordinator at 127.0.0.1:{port}"):
                gone.runs.list()
            assert time.monotonic() - t0 < 30
    # TLS that is not what the coordinator speaks: the CLI's words for it.
    with Client(address=cluster.address, token=cluster.admin_token, insecure=True) as plain:
        with pytest.raises(TlsMismatch, match="speaks TLS"):
            plain.runs.list()


def test_code_is_packed_and_uploaded_once_per_tree(cluster: Cluster, tmp_path: Path) -> None:
    """Many submissions of an unchanged tree send its code once; a changed file is sent anew."""
    cluster.start_coordinator()
    cluster.start_agent()
    root = project(tmp_path)
    (root / "data.txt").write_text("one")
    with sdk(cluster) as client:
        runs = client.runs.submit_many("noop", [[]] * 5, repo=root)
        runs.append(client.runs.submit("noop", repo=root))
        assert len({r.info.code.hash for r in runs}) == 1
        (root / "data.txt").write_text("two!")
        changed = client.runs.submit("noop", repo=root)
        assert changed.info.code.hash != runs[0].info.code.hash
        assert client.runs.wait([*runs, changed], timeout=120) == [RunStatus.DONE] * 7


def test_submit_many_sends_one_batch_and_stops_at_the_first_refused_run(cluster: Cluster, tmp_path: Path) -> None:
    """submit_many sends the runs after the first in SubmitRuns batches: the coordinator's per-user limit
    refuses the third run of the batch alone, the SDK raises that refusal as RequestRejected, and the runs
    before it stay submitted, as when they were sent one by one."""
    from dstack.cli.errors import RequestRejected

    cluster.start_coordinator("--max-queued-per-user", "3", "--max-submissions-per-minute", "0")
    root = project(tmp_path)  # no agent: every run stays queued
    with sdk(cluster) as client:
        with pytest.raises(RequestRejected, match=r"the limit is 3 \(--max-queued-per-user\)"):
            client.runs.submit_many("noop", [[]] * 5, repo=root)
        listed = client.runs.list(all=True)
    assert len(listed) == 3  # the first (alone) and the two of the batch before the refused one


def test_a_thousand_runs_from_one_process(cluster: Cluster, tmp_path: Path) -> None:
    """The issue's check: 1,000 runs submitted from one process, and waited for. The agent's null runtime
    finishes each job at once, so what is measured is the SDK and the control plane."""
    cluster.start_coordinator("--max-queued-per-user", "0", "--max-submissions-per-minute", "0")
    cluster.start_agent("agent-1", "--runtime", "null", "--max-jobs", "1000")
    root = project(tmp_path)
    with sdk(cluster, timeout=120) as client:
        t0 = time.monotonic()
        runs = client.runs.submit_many("noop", [[]] * 1000, repo=root)
        submitted = time.monotonic() - t0
        assert len({r.name for r in runs}) == 1000
        statuses = client.runs.wait(runs, timeout=900)
        waited = time.monotonic() - t0
    assert statuses == [RunStatus.DONE] * 1000
    print(f"1000 runs: submitted in {submitted:.1f} s, all done after {waited:.1f} s")


def test_local_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No coordinator configured: Client() starts the embedded local coordinator and agent, as `dstack` does."""
    import os

    for k in [k for k in os.environ if k.startswith("DSTACK_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("DSTACK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DSTACK_RUNTIME", "host")
    from dstack.cli import local

    try:
        with Client() as client:
            assert client.local
            run = client.runs.submit("train", repo=project(tmp_path), variables={"epochs": 2})
            assert run.wait(timeout=120, check=True) is RunStatus.DONE
            assert next(run.logs()) == "epochs=2 args="
            run.artifacts.download("out/model.txt", to=tmp_path / "dl")
            assert (tmp_path / "dl" / "out" / "model.txt").read_text() == "weights 2\n"
    finally:
        local.stop_all()


def test_unreachable_is_typed_without_tls(tmp_path: Path) -> None:
    with Client(address=f"127.0.0.1:{free_port()}", token="t", insecure=True, timeout=5) as client:
        with pytest.raises(CoordinatorUnreachable, match="Check `dstack config` and that it is running"):
            client.runs.get("x")


def doc_blocks(kind: str) -> list[tuple[str, str]]:
    """docs/sdk.md's fenced blocks of `kind` (python, yaml): (the fence's words after the kind, the text)."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "sdk.md").read_text()
    return [(m.group(1).strip(), m.group(2)) for m in re.finditer(rf"```{kind}([^\n]*)\n(.*?)```", text, re.S)]


def test_the_docs_examples_run(cluster: Cluster, tmp_path: Path) -> None:
    """docs/sdk.md's examples, as written, in a fresh interpreter configured as the CLI is (its environment)."""
    cluster.start_coordinator()
    cluster.start_agent()
    yaml_blocks = dict(doc_blocks("yaml"))
    root = write_project(tmp_path / "proj", yaml_blocks[""], {".dstack/variables.yaml": yaml_blocks["variables"]})
    script = "\n".join(code for words, code in doc_blocks("python") if words != "no-run")
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=cluster.env(), cwd=root, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training for 3 epochs --seed 7" in r.stdout
    assert "weights after 3 epochs" in r.stdout
    assert re.search(r"run \S+ failed.*shows why", r.stdout)
    assert "workflow 'no-such-workflow' is not defined" in r.stdout
    assert (root / "downloads" / "model" / "weights.txt").is_file()


def test_roles_apply_to_the_sdk_as_to_the_cli(cluster: Cluster, tmp_path: Path) -> None:
    """Another member's run cannot be stopped with the SDK, a viewer submits nothing: the coordinator's
    refusals arrive as AuthError with its words, and the run goes on."""
    from tests.integration.test_users import add_user

    cluster.start_coordinator()
    cluster.start_agent()
    root = project(tmp_path)
    alice, bob, vera = add_user(cluster, "alice"), add_user(cluster, "bob"), add_user(cluster, "vera", "viewer")
    with sdk(cluster, token=alice) as as_alice, sdk(cluster, token=bob) as as_bob, sdk(cluster, token=vera) as as_vera:
        run = as_alice.runs.submit("long", repo=root)
        assert next(run.logs(follow=True)) == "started"
        with pytest.raises(AuthError, match=f"only the owner \\(alice\\) or an admin can stop run {run.name}"):
            as_bob.runs.get(run.name).stop()
        with pytest.raises(AuthError):
            as_vera.runs.submit("noop", repo=root)
        assert as_vera.runs.get(run.name).status is RunStatus.RUNNING  # a viewer reads
        assert run.stop() is RunStatus.STOPPED


def test_a_coordinator_with_another_ca_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    """Something answering with a certificate the pinned CA did not sign (a stand-in for the coordinator):
    TlsMismatch before the token is sent."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from dstack.coordinator.tls import make_ca

    cluster.start_coordinator()
    _, other = make_ca()  # a dstack CA, like the real one, but not it
    (tmp_path / "other-ca.pem").write_bytes(other.public_bytes(Encoding.PEM))
    with Client(address=cluster.address, token=cluster.admin_token, ca_file=tmp_path / "other-ca.pem") as client:
        with pytest.raises(TlsMismatch, match="does not match the pinned CA"):
            client.runs.list()
