"""Fencing with real processes (coordinator/fencing.py, docs/architecture.md "Fencing"): an agent frozen
past its lease while its GPU job runs comes back to find that attempt closed: its reports refused, its
process killed, and no GPU held by two jobs at any moment, by the jobs' own evidence; meanwhile its
token, replaying the old attempt by hand after the requeue, is refused call by call."""

from __future__ import annotations

import itertools
import json
import signal
from collections import defaultdict
from pathlib import Path

import grpc
import psutil
import pytest

from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from tests.conftest import Cluster, wait_for, write_project

pytestmark = pytest.mark.integration

# Each job appends "AGENT_HOME GPU-IDS JOB ATTEMPT TIME_NS" to a file on the host every 0.1 s while it
# runs: the interval over which it held its GPUs, as the job itself saw it.
TICK = 'echo "$DSTACK_AGENT_HOME $CUDA_VISIBLE_DEVICES {name} $DSTACK_ATTEMPT $(date +%s%N)" >> {evidence}'


def gpu_project(root: Path, evidence: Path, pids: Path) -> Path:
    """`train`: attempt 1 runs 90 s (until aborted), attempt 2 until the test creates `pids/release`,
    so that b's GPU stays busy until `next` has run on a's, whatever the machine's load."""
    train_tick = TICK.format(name="train", evidence=evidence)
    until_released = f'if [ "$DSTACK_ATTEMPT" != 1 ] && [ -e {pids}/release ]; then break; fi; sleep 0.1'
    return write_project(
        root,
        f"""
        workflows:
          - name: train
            provider: bash
            commands:
              - echo $$ > {pids}/train-$DSTACK_ATTEMPT
              - for i in $(seq 1 900); do {train_tick}; echo "attempt $DSTACK_ATTEMPT tick $i"; {until_released}; done
            resources: {{gpu: 1}}
            retry:
              limit: 1
              on: [agent-lost]
          - name: next
            provider: bash
            commands:
              - for i in $(seq 1 20); do {TICK.format(name="next", evidence=evidence)}; sleep 0.1; done
            resources: {{gpu: 1}}
        """,
    )


def holds(evidence: Path) -> dict[tuple[str, str], dict[tuple[str, str], tuple[int, int]]]:
    """(agent home, GPU ids) -> (job, attempt) -> (first tick, last tick) in ns."""
    out: dict[tuple[str, str], dict[tuple[str, str], tuple[int, int]]] = defaultdict(dict)
    for line in evidence.read_text().splitlines():
        home, gpus, job, attempt, at = line.split()
        spans = out[(home, gpus)]
        first, last = spans.get((job, attempt), (int(at), int(at)))
        spans[(job, attempt)] = (min(first, int(at)), max(last, int(at)))
    return out


def overlaps(evidence: Path) -> list[str]:
    found = []
    for gpu, spans in holds(evidence).items():
        for (a, (a_start, a_end)), (b, (b_start, b_end)) in itertools.combinations(spans.items(), 2):
            if a_start <= b_end and b_start <= a_end:
                found.append(f"GPU {gpu}: {a} ran {a_start}..{a_end} ns, {b} ran {b_start}..{b_end} ns")
    return found


def run_of(cluster: Cluster, project: Path, workflow: str) -> str:
    r = cluster.cli("run", workflow, "-d", cwd=project)
    assert r.returncode == 0, r.stderr
    return next(run["name"] for run in cluster.runs() if run["workflow"] == workflow)


# 24 s to 60 s on the shared 2-core machine (load 20 to 35): `pytest -m long`. In .ci/run, the same guards run
# in process (tests/inproc/test_fencing.py), and test_attempts.py freezes an agent with real processes.
@pytest.mark.long
def test_a_frozen_agent_back_with_its_old_gpu_attempt_never_shares_that_gpu_and_its_reports_are_refused(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.start_coordinator()
    frozen = cluster.start_agent("a", "--simulate-gpus", "1xA100-80GB")
    evidence, pids = tmp_path / "gpu-evidence.txt", tmp_path / "pids"
    pids.mkdir()
    project = gpu_project(tmp_path / "p", evidence, pids)
    train = run_of(cluster, project, "train")
    wait_for(lambda: "attempt 1 tick 3\n" in cluster.cli("logs", train).stdout, what="attempt 1 to run on a")
    job_id = cluster.run_info(train)["jobs"][0]["id"]
    cluster.start_agent("b", "--simulate-gpus", "1xA100-80GB")

    frozen.popen.send_signal(signal.SIGSTOP)  # a partition, as far as the coordinator can tell
    try:
        wait_for(
            lambda: any(a["name"] == "a" and a["status"] == "lost" for a in cluster.agents_json()),
            timeout=60,
            what="a declared lost",
        )
        ticks_when_lost = sum(" train 1 " in ln for ln in evidence.read_text().splitlines())
        wait_for(lambda: "attempt 2 tick 3\n" in cluster.cli("logs", train).stdout, timeout=60, what="attempt 2 on b")
        # While a is frozen, its token replays attempt 1 (and tries attempt 2) by hand.
        replay_old_attempt(cluster, tmp_path / "a", old=job_id, new=f"{job_id}-a2")
        nxt = run_of(cluster, project, "next")  # waits: b's GPU runs attempt 2, a is lost
    finally:
        frozen.popen.send_signal(signal.SIGCONT)

    first = psutil.Process(int((pids / "train-1").read_text()))
    first.wait(timeout=60)  # aborted once a is back
    assert cluster.wait_status(nxt, {"done", "failed", "stopped"}, timeout=90)["status"] == "done"
    (pids / "release").touch()  # attempt 2 may end now
    done = cluster.wait_status(train, {"done", "failed", "stopped"}, timeout=90)
    assert done["status"] == "done", done
    (job,) = done["jobs"]
    assert (job["attempt"], job["agent"]) == (2, "b"), job  # neither a's late exit nor the forged DONE counted
    assert job["attempts"][0]["termination_reason"] == "agent lost"

    # No GPU held by two jobs at once, by the jobs' own ticks; and `next` did land on a's GPU, after
    # the old attempt was gone (the case the fence is for).
    assert overlaps(evidence) == [], overlaps(evidence)
    on_a = [spans for (home, _), spans in holds(evidence).items() if home == str(tmp_path / "a")]
    assert on_a and ("next", "1") in on_a[0] and ("train", "1") in on_a[0], holds(evidence)

    # The old attempt's log ends where a was declared lost: what it printed while frozen (and sent
    # when it came back) was refused, as were the forged lines; none of it is in attempt 2's log.
    text = cluster.cli("logs", train).stdout
    before, _, after = text.partition("── attempt 2 ──\n")
    assert after and "attempt 1" not in after and "FORGED" not in text, text
    shown = [int(ln.split()[-1]) for ln in before.splitlines() if ln.startswith("attempt 1 tick ")]
    assert shown and max(shown) <= ticks_when_lost, (max(shown), ticks_when_lost)
    assert cluster.coordinator is not None and "confirmed ended" in cluster.coordinator.output()


def replay_old_attempt(cluster: Cluster, home: Path, old: str, new: str) -> None:
    """With the agent's own token (from its agent.json), after the requeue: every call about attempt 1
    (`old`, the agent's) or attempt 2 (`new`, another agent's) is refused; a hello still running attempt
    1 is told to abort it, and its forged DONE and lines for either attempt change nothing."""
    creds = json.loads((home / "agent.json").read_text())
    auth = [("authorization", f"Bearer {creds['agent_token']}")]
    with cluster.channel() as ch:
        stub = agent_pb2_grpc.AgentServiceStub(ch)

        def grant(w: str) -> object:
            return stub.GrantUploads(agent_pb2.GrantUploadsRequest(job_id=w), metadata=auth, timeout=10)

        def commit(w: str) -> object:
            return stub.CommitArtifacts(agent_pb2.CommitArtifactsRequest(job_id=w), metadata=auth, timeout=10)

        def upload(w: str) -> object:
            chunk = agent_pb2.UploadArtifactRequest(job_id=w, path="out/x", data=b"forged", last=True)
            return stub.UploadArtifact(iter([chunk]), metadata=auth, timeout=10)

        for wire in (old, new):
            for call in (grant, commit, upload):
                with pytest.raises(grpc.RpcError) as e:
                    call(wire)
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, (wire, call.__name__, e.value)

        hello = agent_pb2.Hello(agent_id=creds["agent_id"], inventory=common_pb2.Inventory(), active_job_ids=[old])
        done = [
            agent_pb2.JobUpdate(job_id=w, status=common_pb2.JOB_STATUS_DONE, has_exit_code=True) for w in (old, new)
        ]
        forged = [common_pb2.LogLine(seq=s, text=f"FORGED line {s}") for s in (1, 1000)]
        lines = [agent_pb2.LogBatch(job_id=w, lines=forged) for w in (old, new)]
        answers: list[agent_pb2.CoordinatorMessage] = []
        stream = stub.Connect(
            iter([agent_pb2.AgentMessage(hello=hello), agent_pb2.AgentMessage(updates=done, logs=lines)]),
            metadata=auth,
            timeout=10,
        )
        try:
            for msg in stream:
                answers.append(msg)
                if sum(len(m.update_acks) for m in answers) >= 2:
                    break
        finally:
            stream.cancel()
    assert [(s.job_id, s.abort) for m in answers for s in m.stops] == [(old, True)], answers
