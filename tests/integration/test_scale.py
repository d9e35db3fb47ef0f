"""Scale (issue 16 item 5) against real processes: the load generator of bench/scale.py at a tiny size so it
does not rot (no speed thresholds: the figures are the bench's), and SubmitRuns, the batch call it uses,
attacked: a batch over the cap, a bad run inside a good batch, a batch past the queued-jobs limit, a
viewer's batch."""

from __future__ import annotations

import grpc
import pytest

from bench._harness import ADMIN, JOIN, Services, meta
from bench.loadgen import MASKED_BY_WRITE, AgentStats, Fleet, Target, _Worker, submit_runs
from bench.scale import said, scenario, time_ps
from dstack.protos.v1 import client_pb2, client_pb2_grpc, common_pb2
from tests.conftest import Cluster, wait_for
from tests.integration.test_users import add_user

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("fill_first", [True, False], ids=["fill-first", "agents-first"])
def test_the_scale_bench_runs_end_to_end_at_a_tiny_size(fill_first: bool) -> None:
    f = scenario(
        agents=20, queued=200, runs=60, procs=1, submitters=1, fill_first=fill_first, steady_s=0, say=False, cli_ps=1
    )
    assert f.errors == 0
    assert f.online_at_end == 20 and f.lost == 0 and f.failed == 0  # every simulated agent stayed online
    assert f.queued_seen == 200  # every agent held one job, the rest waited
    assert f.passes > 0 and f.ps_ms and f.ps_finished_ms and len(f.cli_ps_ms) == 1  # the real `dstack ps` ran
    assert f.drain_rate > 0 and f.single_rate > 0 and f.batch_rate > 0
    # The coordinator's CPU is counted per phase and per run filled; nothing it logged was a warning.
    first = ["fill", "connect"] if fill_first else ["connect", "fill"]
    assert list(f.phases) == [*first, "full queue", "drain", "single", "batch"]
    assert all(wall > 0 and cpu >= 0 for wall, cpu in f.phases.values()) and f.fill_cpu_ms > 0 and f.fill_s > 0
    assert f.coordinator_said == {}


def test_a_write_to_an_ended_stream_is_counted_as_that_and_the_coordinator_s_warnings_by_message() -> None:
    """grpc.aio turns a write to a call that had already ended into INTERNAL "Internal error from Core",
    hiding the status the coordinator sent: the load generator counts it as an ended stream (its cause is
    the coordinator's, which bench.scale prints from its log by message), and any other status as it is."""
    worker = _Worker(Target("127.0.0.1:1", ""), [("sim-0", 0)], hold=True)
    agent = worker.agents[0]
    masked = grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, None, None, MASKED_BY_WRITE, "send failed")
    agent._failed("stream", masked)
    agent._failed("hello", grpc.aio.AioRpcError(grpc.StatusCode.UNAUTHENTICATED, None, None, "unknown agent token", ""))
    assert worker.stats.failures == {
        "stream: the stream had ended under a write (grpc reports INTERNAL, hiding the status)": 1,
        "hello: UNAUTHENTICATED unknown agent token": 1,
    }
    assert worker.stats.errors == 2

    log = (
        "2026-12-01 03:10:01,123 WARNING dstack.coordinator: agent 3f2a9c0d1e lost: its lease ran out (15.2 s)\n"
        "2026-12-01 03:10:02,456 WARNING dstack.coordinator: agent 77aa00bb11 lost: its lease ran out (16.0 s)\n"
        "2026-12-01 03:10:03,000 INFO dstack.coordinator: agent 3f2a9c0d1e connected (session 2)\n"
        "2026-12-01 03:10:04,000 ERROR dstack.coordinator: agent 3f2a9c0d1e stream failed\n"
        "Traceback (most recent call last):\n"
    )
    assert said(log) == {
        "WARNING dstack.coordinator: agent # lost: its lease ran out (# s)": 2,
        "ERROR dstack.coordinator: agent # stream failed": 1,
    }


def test_simulated_agents_outlive_a_coordinator_killed_under_them_and_a_failed_sample_is_reported() -> None:
    """Attack: kill -9 of the coordinator under the load generator's agents, each holding a job, then the
    coordinator started again on the same state and port. Every agent's session fails: each failure is
    counted with its cause, and each agent reconnects as a real one does (same credential, its held job
    listed in its hello), so the job is neither lost nor failed. A `ListRuns` sample taken while the
    coordinator is down is reported, not raised (the full-size bench used to abort on either)."""
    svc = Services()
    fleet: Fleet | None = None
    try:
        svc.start_coordinator()
        target = Target(svc.address, str(svc.ca_file), JOIN, ADMIN)
        fleet = Fleet(target, 4, 1, hold=True)
        f = fleet
        wait_for(lambda: f.stats().connected == 4, 90, 0.2, "4 simulated agents to connect")
        assert submit_runs(target, 4, procs=1, in_flight=2).submitted == 4
        wait_for(lambda: f.stats().held == 4, 90, 0.2, "each agent to hold a job")

        assert svc.coordinator is not None
        svc.coordinator.kill()
        svc.coordinator.wait()
        failures: list[str] = []
        assert time_ps(svc, 1, failures=failures) == []
        assert len(failures) == 1 and "UNAVAILABLE" in failures[0]

        svc.start_coordinator()

        def reconnected() -> AgentStats | None:
            s = f.stats()
            return s if s.reconnected >= 4 and s.connected == 4 else None

        s = wait_for(reconnected, 120, 0.2, "every agent to reconnect")
        assert s.errors >= 4 and sum(s.failures.values()) == s.errors  # each failure counted with its cause
        assert s.registered == 4 and s.held == 4  # the same credentials; the jobs still held

        fleet.release()
        stub = svc.client_stub()

        def statuses() -> list[int]:
            runs = stub.ListRuns(client_pb2.ListRunsRequest(all=True), metadata=meta(), timeout=30).runs
            return [j.status for r in runs for j in r.jobs]

        wait_for(lambda: statuses().count(common_pb2.JOB_STATUS_DONE) == 4, 90, 0.2, "the held jobs to end DONE")
        assert len(statuses()) == 4 and f.stats().done == 4
    finally:
        if fleet is not None:
            fleet.stop()
        svc.stop()


def run(name: str) -> client_pb2.SubmitRunRequest:
    job = common_pb2.JobSpec(job_name=name, workflow="w", provider="bash", commands=["true"])
    return client_pb2.SubmitRunRequest(workflow="w", jobs=[job])


def test_submit_runs_takes_each_run_alone_and_refuses_an_oversized_batch(cluster: Cluster) -> None:
    cluster.start_coordinator("--max-queued-per-user", "3", "--max-submissions-per-minute", "0")
    stub = client_pb2_grpc.ClientServiceStub(cluster.channel())
    admin = [("authorization", f"Bearer {cluster.admin_token}")]

    # Over the cap: refused whole, before anything is stored.
    with pytest.raises(grpc.RpcError) as e:
        stub.SubmitRuns(client_pb2.SubmitRunsRequest(runs=[run("a")] * 1001), metadata=admin)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 1000 runs per call" in str(e.value.details())
    assert not stub.ListRuns(client_pb2.ListRunsRequest(all=True), metadata=admin).runs

    # A run whose job name is a path escape, between good ones: it alone is refused. Then the user's
    # queued-jobs limit (3) holds across the batch: the runs past it are refused, each saying why.
    batch = [run("a"), run(".."), run("b"), run("c"), run("d")]
    resp = stub.SubmitRuns(client_pb2.SubmitRunsRequest(runs=batch), metadata=admin)
    assert len(resp.runs) == len(resp.errors) == 5
    assert resp.errors[0] == "" and resp.runs[0].name
    assert "job name" in resp.errors[1] and not resp.runs[1].name
    stored = [r.name for r, err in zip(resp.runs, resp.errors, strict=True) if not err]
    assert len(stored) == 3
    assert sum("--max-queued-per-user" in err for err in resp.errors) == 1
    listed = {r.name for r in stub.ListRuns(client_pb2.ListRunsRequest(all=True), metadata=admin).runs}
    assert listed == set(stored)

    # A viewer may not submit, in a batch either.
    viewer = [("authorization", f"Bearer {add_user(cluster, 'vera', 'viewer')}")]
    with pytest.raises(grpc.RpcError) as e:
        stub.SubmitRuns(client_pb2.SubmitRunsRequest(runs=[run("v")]), metadata=viewer)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
