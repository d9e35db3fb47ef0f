"""The permission table covers every RPC, and the interceptor refuses before a handler runs."""

from __future__ import annotations

from pathlib import Path

from dstack.coordinator.auth import PERMISSIONS, Role, bearer_token
from dstack.protos.v1 import agent_pb2, client_pb2


def test_every_method_of_every_service_is_in_the_table() -> None:
    methods = {
        f"/{service.full_name}/{m.name}"
        for file in (client_pb2.DESCRIPTOR, agent_pb2.DESCRIPTOR)
        for service in file.services_by_name.values()
        for m in service.methods
    }
    assert methods == set(PERMISSIONS), methods ^ set(PERMISSIONS)


def test_agent_calls_need_an_agent_and_client_calls_a_user() -> None:
    for method, role in PERMISSIONS.items():
        if method.startswith("/dstack.v1.ClientService/"):
            assert role is Role.USER, method
        elif method != "/dstack.v1.AgentService/Register":
            assert role is Role.AGENT, method
    assert PERMISSIONS["/dstack.v1.AgentService/Register"] is Role.JOIN


def test_bearer_token() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token(None) is None


def test_servicers_only_translate() -> None:
    """No servicer authenticates by hand or reaches past coordinator/app into the engine or store."""
    services = Path(__file__).resolve().parents[2] / "coordinator" / "services"
    for path in services.glob("*.py"):
        text = path.read_text()
        for word in ("engine", ".store", ".db(", "bearer_token", "invocation_metadata", "authenticate("):
            assert word not in text, f"{path.name} uses {word!r}"
