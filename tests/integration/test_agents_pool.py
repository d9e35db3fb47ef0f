"""The pool's names: one agent per name, lost agents replaced by name and forgotten after a while."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc
import pytest

from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from tests.conftest import PY, REPO, Cluster, Proc, wait_for

pytestmark = pytest.mark.integration

REFUSED = "an agent named gpu-1 is already online (host {host}); choose another --name"


def spawn_agent(cluster: Cluster, name: str, home: Path) -> Proc:
    """An agent with a home (and log) of its own: a different agent, whatever its --name."""
    log = home.with_suffix(".log")
    with log.open("ab") as f:
        popen = subprocess.Popen(
            [
                *(PY, "-m", "dstack.agent", "--coordinator", cluster.address),
                *("--home", str(home), "--name", name, "--runtime", "host", "--job-user", "none"),
                *cluster.transport_args(),
            ],
            stdout=f,
            stderr=f,
            env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            | {"DSTACK_JOIN_TOKEN": cluster.join_token},
            cwd=REPO,
        )
    proc = Proc(popen, log)
    cluster.agents.append(proc)
    return proc


def pool(cluster: Cluster) -> list[tuple[str, str]]:
    return [(str(a["name"]), str(a["status"])) for a in cluster.agents_json()]


def online_host(cluster: Cluster) -> str:
    return str(next(a["host"] for a in cluster.agents_json() if a["name"] == "gpu-1"))


def test_a_second_agent_with_the_name_of_an_online_one_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("gpu-1")
    spawn_agent(cluster, "gpu-1", tmp_path / "other-home")
    coordinator = cluster.coordinator
    assert coordinator is not None
    wait_for(lambda: "registration refused" in coordinator.output(), what="the coordinator to refuse the name")
    assert pool(cluster) == [("gpu-1", "online")]
    # What the agent is told, on the wire.
    with cluster.channel() as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Register(
                agent_pb2.RegisterRequest(
                    join_token=cluster.join_token, name="gpu-1", inventory=common_pb2.Inventory(hostname="elsewhere")
                ),
                metadata=[("authorization", f"Bearer {cluster.join_token}")],
                timeout=30,
            )
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert e.value.details() == REFUSED.format(host=online_host(cluster))
    assert pool(cluster) == [("gpu-1", "online")]


def test_the_refused_agent_exits_with_the_reason(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.start_agent("gpu-1")
    second = spawn_agent(cluster, "gpu-1", tmp_path / "other-home")
    wait_for(lambda: second.popen.poll() is not None, timeout=20, what="the refused agent to exit")
    assert second.popen.returncode != 0
    assert REFUSED.format(host=online_host(cluster)) in second.output()
    assert "Traceback" not in second.output()


def test_a_new_agent_takes_the_name_of_a_lost_one(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    first = cluster.start_agent("gpu-1")
    first.kill9()
    wait_for(lambda: pool(cluster) == [("gpu-1", "lost")], what="the agent to be lost")
    spawn_agent(cluster, "gpu-1", tmp_path / "new-home")
    wait_for(lambda: pool(cluster) == [("gpu-1", "online")], what="the new agent to hold the name")
    # The pool works with it.
    r = cluster.cli("agents")
    assert r.returncode == 0 and r.stdout.count("gpu-1") == 1, r.stdout


def test_lost_agents_are_forgotten_after_the_period(cluster: Cluster) -> None:
    cluster.start_coordinator("--forget-lost-agents-after", "1")
    cluster.start_agent("stays")
    cluster.start_agent("goes").kill9()
    wait_for(lambda: pool(cluster) == [("stays", "online")], what="the lost agent to be forgotten")
