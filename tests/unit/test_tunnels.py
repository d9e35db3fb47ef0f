"""Port tunnels' rules without a network: single-use ids bound to one agent, the agent's own port
check (it never dials a port the job did not declare, whatever the coordinator asks), and the CLI's
`[LOCAL:]REMOTE`."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dstack.agent.tunnels import JobPorts, Tunnels
from dstack.cli.errors import RequestRejected
from dstack.cli.tunnel import Forward, PortSpec, describe
from dstack.coordinator.errors import Forbidden
from dstack.coordinator.tunnel_registry import TunnelRegistry
from dstack.protos.v1 import agent_pb2, common_pb2


def test_a_tunnel_id_is_claimed_once_and_only_by_the_agent_asked() -> None:
    async def scenario() -> None:
        reg: TunnelRegistry[str] = TunnelRegistry()
        tid, answer = reg.expect("agent-a")
        other, _ = reg.expect("agent-a")
        assert tid != other and len(tid) >= 32
        with pytest.raises(Forbidden):
            reg.claim(tid, "agent-b", "peer-of-b")  # a foreign agent: refused, the tunnel still waits
        with pytest.raises(Forbidden):
            reg.claim("forged", "agent-a", "x")
        reg.claim(tid, "agent-a", "peer-of-a")
        assert answer.result() == "peer-of-a"
        with pytest.raises(Forbidden):
            reg.claim(tid, "agent-a", "again")  # single use
        reg.forget(other)  # the CLI stopped waiting: a late answer is refused
        with pytest.raises(Forbidden):
            reg.claim(other, "agent-a", "late")
        assert len(reg) == 0

    asyncio.run(scenario())


def test_the_agent_reaches_only_declared_ports() -> None:
    ports = JobPorts([(8888, 8888), (9000, 80)])
    assert ports.address(8888) == ("127.0.0.1", 8888)
    assert ports.address(80) == ("127.0.0.1", 9000)  # a container's port, published on the host
    assert ports.address(9000) is None  # the host side of a mapping is not a port the job declared
    assert ports.address(22) is None


class _FakeCall:
    def __init__(self) -> None:
        self.frames: list[common_pb2.TunnelFrame] = []

    async def write(self, frame: common_pb2.TunnelFrame) -> None:
        self.frames.append(frame)

    async def done_writing(self) -> None:
        pass

    async def code(self) -> Any:
        return None

    def cancel(self) -> None:
        pass


class _FakeStub:
    def __init__(self) -> None:
        self.call = _FakeCall()

    def Tunnel(self, metadata: Any) -> _FakeCall:
        return self.call


def test_the_agent_refuses_an_undeclared_port_whatever_the_coordinator_asks() -> None:
    stub = _FakeStub()
    known = {"job-1": JobPorts([(8888, 8888)])}
    tunnels = Tunnels(stub, lambda: [], known.get)  # type: ignore[arg-type]

    async def scenario() -> None:
        tunnels.open(agent_pb2.OpenTunnel(tunnel_id="t1", job_id="job-1", port=22))
        tunnels.open(agent_pb2.OpenTunnel(tunnel_id="t2", job_id="job-2", port=8888))
        await asyncio.sleep(0.05)
        await tunnels.close()

    asyncio.run(scenario())
    by_id = {f.tunnel_id: f.error for f in stub.call.frames}
    assert by_id["t1"] == "port 22 is not one of the job's ports (8888)"
    assert by_id["t2"] == "job job-2 is not running on this agent"


def test_port_spec() -> None:
    assert PortSpec.parse("8888") == PortSpec(8888, 0)
    assert PortSpec.parse("9000:8888") == PortSpec(8888, 9000)
    for bad in ("", "x", "0", "70000", "1:2:3", "a:80", "70000:80"):
        with pytest.raises(RequestRejected):
            PortSpec.parse(bad)


def test_printed_urls_carry_the_app_and_its_path() -> None:
    lab = Forward("r", "lab", 8888, 50123, app="lab", url_path="lab?token=abc")
    assert lab.url == "http://127.0.0.1:50123/lab?token=abc"
    assert describe(lab, several_jobs=False) == "lab: http://127.0.0.1:50123/lab?token=abc"
    plain = Forward("r", "web", 8080, 50124)
    assert describe(plain, several_jobs=True) == "web: port 8080: http://127.0.0.1:50124/"
