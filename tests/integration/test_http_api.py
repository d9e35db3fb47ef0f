"""The HTTP API, /metrics, and gRPC health and reflection, against a real coordinator with TLS and a
real agent: every endpoint with each role, paging, logs followed as Server-Sent Events."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from dstack.coordinator.http.api import ENDPOINTS
from dstack.coordinator.http.openapi import openapi_path, role_of
from tests.conftest import Cluster, LocalMode, free_port, wait_for, write_project

pytestmark = pytest.mark.integration

LINES = 100_000
RANK = {"viewer": 0, "member": 1, "admin": 2}
NEEDED = {"user": 0, "member": 1, "admin": 2}


@dataclass
class Api:
    cluster: Cluster
    port: int
    project: Path
    tokens: dict[str, str] = field(default_factory=dict)  # role -> token
    finished: str = ""  # a run that ended done

    def ctx(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cluster.ca_file))

    def conn(self, timeout: float = 60) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx(), timeout=timeout)

    def get(self, path: str, token: str | None = None, **headers: str) -> tuple[int, bytes, http.client.HTTPResponse]:
        c = self.conn()
        try:
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
            c.request("GET", path, headers=headers)
            r = c.getresponse()
            return r.status, r.read(), r
        finally:
            c.close()

    def json(self, path: str, role: str = "admin", **query: Any) -> Any:
        q = urlencode(query, doseq=True)
        status, body, _ = self.get(path + (f"?{q}" if q else ""), self.tokens[role])
        assert status == 200, (path, status, body[:500])
        return json.loads(body)

    def run(self, workflow: str) -> str:
        r = self.cluster.cli("run", "-d", workflow, cwd=self.project)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()


def add_user(cluster: Cluster, name: str, role: str) -> str:
    r = cluster.cli("users", "add", name, "--role", role)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()[1]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("http")
    cluster = Cluster(tmp, free_port())
    port = free_port()
    scrape = tmp / "scrape-token"
    scrape.write_text("prometheus-scrape-token\n")
    try:
        cluster.start_coordinator("--http-port", str(port), "--metrics-token-file", str(scrape))
        cluster.start_agent("agent-1", "--simulate-gpus", "2xA100-80GB")
        project = write_project(
            tmp / "p",
            f"""
            workflows:
              - name: hello
                provider: bash
                commands:
                  - echo hello
                  - mkdir -p out && printf artifact-bytes > out/f.txt
                artifacts: [out]
              - name: two
                provider: bash
                commands:
                  - sleep 600
                resources: {{gpu: 2}}
              - name: sleepy
                provider: bash
                commands:
                  - sleep 600
              - name: many
                provider: bash
                commands:
                  - seq 1 {LINES}
            """,
        )
        a = Api(cluster, port, project)
        a.tokens = {
            "admin": cluster.admin_token,
            "member": add_user(cluster, "mia", "member"),
            "viewer": add_user(cluster, "vera", "viewer"),
        }
        yield a
    finally:
        cluster.stop_all()


def metrics(api: Api, token: str) -> dict[str, float]:
    status, body, r = api.get("/metrics", token)
    assert status == 200, body
    assert r.getheader("Content-Type", "").startswith("text/plain")
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()))
            out[key] = s.value
    return out


def test_metrics_parse_and_change_after_a_run(api: Api) -> None:
    before = metrics(api, api.tokens["viewer"])
    assert before["dstack_agents,status=online"] == 1
    assert all(k.startswith(("dstack_", "python_", "process_")) for k in before), sorted(before)
    name = api.run("hello")
    api.cluster.wait_status(name, {"done"}, timeout=120)
    after = wait_for(
        lambda: m if (m := metrics(api, "prometheus-scrape-token"))["dstack_log_lines_total"] > 0 else None,
        timeout=60,
        what="log lines counted",
    )
    assert after["dstack_runs,status=done"] == before.get("dstack_runs,status=done", 0) + 1
    assert after["dstack_jobs,status=done"] == before.get("dstack_jobs,status=done", 0) + 1
    assert after["dstack_scheduling_pass_seconds_count"] > before["dstack_scheduling_pass_seconds_count"]
    assert after["dstack_dispatch_latency_seconds_count"] == before["dstack_dispatch_latency_seconds_count"] + 1
    assert after["dstack_assignments_total"] == before["dstack_assignments_total"] + 1
    assert after["dstack_store_errors_total"] == 0
    # The serving process runs the GC policy (coordinator/gc_policy.py): start-up's objects frozen at once,
    # every collection timed.
    assert after["dstack_gc_frozen_objects"] > 10_000
    assert after["dstack_gc_collection_seconds_count,generation=0"] > 0
    gpus = {k: v for k, v in after.items() if k.startswith("dstack_gpu_memory_total_bytes,agent=agent-1,")}
    assert len(gpus) == 2 and all(v >= 80e9 for v in gpus.values()), gpus
    held = [v for k, v in after.items() if k.startswith("dstack_gpu_allocated,agent=agent-1,")]
    assert held == [0, 0]  # the run has ended: no GPU is held
    api.finished = name


def test_every_endpoint_with_each_role(api: Api) -> None:
    """Viewers read everything a read needs; without a token, with a wrong one, or with an agent's, nothing."""
    if not api.finished:
        api.finished = api.run("hello")
        api.cluster.wait_status(api.finished, {"done"}, timeout=120)
    agent_token = json.loads((api.cluster.tmp / "agent-1" / "agent.json").read_text())["agent_token"]
    files = api.json(f"/api/runs/{api.finished}/artifacts", "viewer")["files"]
    assert [(f["job_name"], f["path"], f["size"]) for f in files] == [("hello", "out/f.txt", 14)], files
    reads = [ep for ep in ENDPOINTS if ep.method == "GET"]
    checked = 0
    for ep in reads:
        path = ep.path.replace("{name}", api.finished).replace("{job}", "hello").replace("{path:.+}", "out/f.txt")
        role = role_of(ep.rpc)
        for who, token in [*api.tokens.items(), ("none", None), ("bad", "not-a-token"), ("agent", agent_token)]:
            status, body, r = api.get(path, token)
            if role == "public":
                want = 200
            elif who in RANK:
                want = 200 if RANK[who] >= NEEDED[role] else 403
            elif who == "agent":
                want = 403  # a valid token, but an agent's
            else:
                want = 401
            assert status == want, (ep.path, who, status, body[:300])
            if want == 401:
                assert r.getheader("WWW-Authenticate", "").startswith("Bearer")
            if want != 200:
                assert json.loads(body)["error"]["message"], body
            checked += 1
    assert checked == len(reads) * 6 and len(reads) >= 11
    for token, want in [
        (None, 401),
        ("not-a-token", 401),
        (api.tokens["viewer"], 200),
        ("prometheus-scrape-tokenX", 401),
    ]:
        assert api.get("/metrics", token)[0] == want, token
    assert api.get("/api/nowhere", api.tokens["admin"])[0] == 404
    assert api.get("/api/runs", None, Authorization=f"Basic {api.tokens['admin']}")[0] == 401


def send(api: Api, method: str, path: str, token: str | None, body: Any = None) -> tuple[int, Any]:
    c = api.conn()
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
        c.request(method, path, body=data, headers={**headers, "Content-Type": "application/json"})
        r = c.getresponse()
        raw = r.read()
        return r.status, json.loads(raw) if raw else None
    finally:
        c.close()


def test_every_write_endpoint_refuses_those_below_its_role_and_changes_nothing(api: Api) -> None:
    """Each write without a token, with a wrong one, an agent's, or a viewer's (and a member's, where an admin
    is needed): refused before it acts. Another user's token is an admin's to rotate, whatever the role table
    lets through (a user may rotate their own: app/users.rotate)."""
    if not api.finished:
        api.finished = api.run("hello")
        api.cluster.wait_status(api.finished, {"done"}, timeout=120)
    agent_token = json.loads((api.cluster.tmp / "agent-1" / "agent.json").read_text())["agent_token"]

    def users() -> list[tuple[str, str, int]]:  # not last_seen: each call is a sighting
        return [(u["name"], u["role"], u["created_at_ns"]) for u in api.json("/api/users", "admin")["users"]]

    before = (users(), api.json("/api/join-tokens", "admin"), api.json("/api/secrets", "admin"))
    writes = [ep for ep in ENDPOINTS if ep.method != "GET"]
    for ep in writes:
        path = (
            ep.path.replace("{name}", api.finished)
            .replace("{user}", "admin")
            .replace("{id}", "nope")
            .replace("{secret}", "SOME_KEY")
        )
        assert "{" not in path, path
        role = role_of(ep.rpc)
        callers = [("none", None, 401), ("bad", "not-a-token", 401), ("agent", agent_token, 403)]
        callers.append(("viewer", api.tokens["viewer"], 403))
        if role == "admin" or ep.rpc == "RotateUserToken":
            callers.append(("member", api.tokens["member"], 403))
        for who, token, want in callers:
            status, body = send(api, ep.method, path, token, {"value": "x" * 12, "name": "eve", "role": "admin"})
            assert status == want, (ep.method, path, who, status, body)
            assert body["error"]["message"], body
    after = (users(), api.json("/api/join-tokens", "admin"), api.json("/api/secrets", "admin"))
    assert after == before
    assert len(writes) >= 8


def test_writes_with_each_role_and_secret_values_never_come_back(api: Api) -> None:
    value = "s3cr3t-value-never-shown"
    personal = {"value": value, "personal": True}
    for who, want in [("none", 401), ("bad", 401), ("viewer", 403), ("member", 200), ("admin", 200)]:
        token = {"none": None, "bad": "not-a-token"}.get(who, api.tokens.get(who))
        status, body = send(api, "PUT", "/api/secrets/API_KEY", token, personal)
        assert status == want, (who, status, body)
        assert value not in json.dumps(body)
    # A team secret: admins only (the use case's check, as over gRPC).
    status, body = send(api, "PUT", "/api/secrets/TEAM_KEY", api.tokens["member"], {"value": value})
    assert status == 403 and "admin" in body["error"]["message"], body
    assert send(api, "PUT", "/api/secrets/TEAM_KEY", api.tokens["admin"], {"value": value})[0] == 200
    for bad in (b"{not json", b"[1]", json.dumps({"value": 5}).encode(), json.dumps({"personal": "yes"}).encode()):
        assert send(api, "PUT", "/api/secrets/X", api.tokens["member"], bad)[0] == 400, bad
    for role in ("viewer", "member", "admin"):
        status, raw, _ = api.get("/api/secrets", api.tokens[role])
        assert status == 200 and value.encode() not in raw
    listed = api.json("/api/secrets", "member")["secrets"]
    assert {(s["name"], s["personal"]) for s in listed} == {("API_KEY", True), ("TEAM_KEY", False)}
    assert send(api, "DELETE", "/api/secrets/TEAM_KEY", api.tokens["member"])[0] == 403
    assert send(api, "DELETE", "/api/secrets/API_KEY?personal=true", api.tokens["viewer"])[0] == 403
    assert send(api, "DELETE", "/api/secrets/API_KEY?personal=true", api.tokens["member"])[0] == 200
    assert send(api, "DELETE", "/api/secrets/TEAM_KEY", api.tokens["admin"])[0] == 200
    # Stopping: a member, but only the owner or an admin.
    name = api.run("sleepy")
    api.cluster.wait_status(name, {"running"}, timeout=120)
    assert send(api, "POST", f"/api/runs/{name}/stop", None)[0] == 401
    assert send(api, "POST", f"/api/runs/{name}/stop", api.tokens["viewer"])[0] == 403
    status, body = send(api, "POST", f"/api/runs/{name}/stop", api.tokens["member"])
    assert status == 403 and "owner" in body["error"]["message"], body
    assert send(api, "POST", f"/api/runs/{name}/stop", api.tokens["admin"])[0] == 200
    api.cluster.wait_status(name, {"stopped"}, timeout=120)
    # A read endpoint does not answer another method.
    assert send(api, "DELETE", "/api/runs", api.tokens["admin"])[0] == 405


def test_resources_answer_what_the_cli_sees(api: Api) -> None:
    if not api.finished:
        api.finished = api.run("hello")
        api.cluster.wait_status(api.finished, {"done"}, timeout=120)
    status, raw, _ = api.get("/api/openapi.json")  # public: the schema only
    assert status == 200
    served = {(m.upper(), p) for p, ops in json.loads(raw)["paths"].items() for m in ops}
    assert served == {(ep.method, openapi_path(ep.path)) for ep in ENDPOINTS} | {("GET", "/metrics")}
    for method, path in served:  # every documented route exists: no 404 or 405 (401 without a token)
        real = path.replace("{name}", api.finished).replace("{job}", "hello").replace("{path}", "out/f.txt")
        real = real.replace("{secret}", "NOPE").replace("{user}", "nobody").replace("{id}", "nope")
        c = api.conn()
        try:
            c.request(method, real)
            got = c.getresponse()
            got.read()
            assert got.status in (200, 401), (method, path, got.status)
        finally:
            c.close()
    who = api.json("/api/whoami", "viewer")
    assert (who["user"], who["role"]) == ("vera", "viewer")
    run = api.json(f"/api/runs/{api.finished}", "viewer")
    assert run["status"] == "done" and run["owner"] == "admin" and run["workflow"] == "hello"
    assert [j["status"] for j in run["jobs"]] == ["done"] and run["jobs"][0]["agent_name"] == "agent-1"
    logs = api.json(f"/api/runs/{api.finished}/logs", "viewer")
    assert [ln["text"] for ln in logs["lines"] if ln["stream"] == "stdout"] == ["hello"]
    assert api.json(f"/api/runs/{api.finished}/logs", "viewer", cursor=logs["cursor"])["lines"] == []
    agents = api.json("/api/agents", "viewer")["agents"]
    assert [(a["name"], a["status"]) for a in agents] == [("agent-1", "online")]
    assert [g["index"] for g in agents[0]["gpus"]] == [0, 1] and agents[0]["cpu_count"] > 0
    assert all("A100" in g["name"] and g["memory_total_bytes"] >= 80e9 and not g["busy"] for g in agents[0]["gpus"])
    assert api.json("/api/queue", "viewer") == {"jobs": []}
    assert api.get("/api/runs/no-such-run", api.tokens["viewer"])[0] == 404
    status, raw, r = api.get(f"/api/runs/{api.finished}/artifacts/hello/out/f.txt", api.tokens["viewer"])
    assert (status, raw, r.getheader("Content-Type")) == (200, b"artifact-bytes", "application/octet-stream")
    for missing in ("hello/out/none.txt", "hello/../../etc/passwd", "nojob/out/f.txt"):
        assert api.get(f"/api/runs/{api.finished}/artifacts/{missing}", api.tokens["viewer"])[0] in (400, 404)
    users = {u["name"]: u["role"] for u in api.json("/api/users", "viewer")["users"]}
    assert users == {"admin": "admin", "mia": "member", "vera": "viewer"}
    assert [t["id"] for t in api.json("/api/join-tokens", "admin")["join_tokens"]] == ["default"]
    assert api.json("/api/tags", "viewer", all="true") == {"tags": []}
    for bad in ("limit=0", "limit=100000", "limit=x", "cursor=%%%", "cursor=WzFd", "status=sleeping"):
        status, body, _ = api.get(f"/api/runs?{bad}", api.tokens["viewer"])
        assert status == 400 and json.loads(body)["error"]["message"], (bad, body)
    assert api.get(f"/api/runs/{api.finished}/logs?cursor=!!", api.tokens["viewer"])[0] == 400


def test_runs_are_paged_with_no_cap_no_skip_no_repeat(api: Api) -> None:
    names = {api.run("hello") for _ in range(5)}
    pages: list[list[str]] = []
    cursor = None
    newer = ""
    while True:
        page = api.json("/api/runs", "viewer", limit=2, **({"cursor": cursor} if cursor else {}))
        pages.append([r["name"] for r in page["runs"]])
        if len(pages) == 1:
            newer = api.run("hello")  # a run submitted mid-way is not on later pages, and shifts nothing
        cursor = page["next_cursor"]
        if cursor is None:
            break
    seen = [n for p in pages for n in p]
    assert len(seen) == len(set(seen)), pages
    assert names <= set(seen) and newer not in seen
    assert all(len(p) == 2 for p in pages[:-1])
    everything = api.json("/api/runs", "viewer", limit=500)
    assert everything["next_cursor"] is None and len(everything["runs"]) == len(seen) + 1
    mine = api.json("/api/runs", "viewer", owner="mia", limit=500)["runs"]
    assert mine == []
    hello = api.json("/api/runs", "viewer", workflow="hello", owner="admin", limit=500)["runs"]
    assert all((r["workflow"], r["owner"]) == ("hello", "admin") for r in hello)
    assert {r["name"] for r in hello} >= names | {newer}
    sleepy = api.json("/api/runs", "viewer", workflow="sleepy", limit=500)["runs"]
    assert not {r["name"] for r in sleepy} & {r["name"] for r in hello}
    for n in names | {newer}:
        api.cluster.wait_status(n, {"done"}, timeout=120)
    done = api.json("/api/runs", "viewer", status=["done", "failed"], limit=500)["runs"]
    assert {r["name"] for r in done} >= names | {newer}


def sse_events(r: http.client.HTTPResponse) -> Iterator[tuple[str, str, str]]:
    """(event, id, data) of each Server-Sent Event."""
    event, ident = "message", ""
    data: list[str] = []
    while True:
        raw = r.readline()
        if not raw:
            return
        line = raw.decode().rstrip("\n")
        if not line:
            if data:
                yield event, ident, "\n".join(data)
            event, ident, data = "message", "", []
        elif line.startswith("event: "):
            event = line[7:]
        elif line.startswith("id: "):
            ident = line[4:]
        elif line.startswith("data: "):
            data.append(line[6:])


def follow(
    api: Api, name: str, stop_after_events: int = 0, headers: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], str, str]:
    """Lines received, the last event id, and the last event's type."""
    c = api.conn(timeout=300)
    c.request(
        "GET",
        f"/api/runs/{name}/logs",
        headers={"Authorization": f"Bearer {api.tokens['viewer']}", "Accept": "text/event-stream", **(headers or {})},
    )
    r = c.getresponse()
    assert r.status == 200 and r.getheader("Content-Type", "").startswith("text/event-stream"), r.read()[:300]
    lines: list[dict[str, Any]] = []
    last_id, last_event, n = "", "", 0
    try:
        for event, ident, data in sse_events(r):
            last_id, last_event, n = ident, event, n + 1
            if event == "lines":
                lines.extend(json.loads(data)["lines"])
            elif event == "end":
                assert json.loads(data)["status"] == "done", data
                break
            if stop_after_events and n >= stop_after_events:
                break
    finally:
        c.close()
    return lines, last_id, last_event


def test_sse_follow_delivers_every_line_of_a_100000_line_job_in_order(api: Api) -> None:
    name = api.run("many")
    lines, _, last = follow(api, name)  # from submission: the job is followed live
    assert last == "end"
    out = [ln for ln in lines if ln["stream"] == "stdout"]
    assert [ln["text"] for ln in out] == [str(i) for i in range(1, LINES + 1)]
    seqs = [ln["seq"] for ln in lines]
    assert seqs == sorted(set(seqs)), "a line repeated or out of order"
    # A reconnecting client sends the last event's id back: the rest, once.
    first, last_id, _ = follow(api, name, stop_after_events=1)
    assert 0 < len(first) < len(lines)
    rest, _, last = follow(api, name, headers={"Last-Event-ID": last_id})
    assert last == "end" and first + rest == lines


def test_grpc_health_without_a_token_and_reflection_with_one(api: Api) -> None:
    with api.cluster.channel() as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        for service in ("", "dstack.v1.ClientService", "dstack.v1.AgentService"):
            r = check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert r.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as e:
            check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
        ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
        with pytest.raises(grpc.RpcError) as e:
            list(reflect(iter(ask), timeout=10))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = list(reflect(iter(ask), timeout=10, metadata=[("authorization", f"Bearer {api.tokens['viewer']}")]))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"dstack.v1.ClientService", "dstack.v1.AgentService", "grpc.health.v1.Health"} <= names
        # Health is the only thing public: a client call without a token is still refused.
        from dstack.protos.v1 import client_pb2, client_pb2_grpc

        with pytest.raises(grpc.RpcError) as e:
            client_pb2_grpc.ClientServiceStub(channel).ListRuns(client_pb2.ListRunsRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_http_url_is_recorded_and_plain_http_is_refused(api: Api) -> None:
    url = (api.cluster.tmp / "server" / "http-url").read_text().strip()
    assert url == f"https://127.0.0.1:{api.port}"
    c = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    try:
        c.request("GET", "/api/whoami", headers={"Authorization": f"Bearer {api.tokens['admin']}"})
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            c.getresponse().read()
    finally:
        c.close()


def test_local_mode_serves_the_api_on_loopback_only(local: LocalMode, tmp_path: Path) -> None:
    """The embedded coordinator serves HTTP on 127.0.0.1 (a free port, recorded), with the local token."""
    r = local.cli("ps", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    state = local.home / "local" / "server"
    url = wait_for(lambda: (state / "http-url").read_text().strip() if (state / "http-url").exists() else None)
    assert url.startswith("http://127.0.0.1:"), url
    port = int(url.rsplit(":", 1)[1])
    token = (local.home / "local" / "admin-token").read_text().strip()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("GET", "/api/whoami", headers={"Authorization": f"Bearer {token}"})
        r1 = c.getresponse()
        assert r1.status == 200 and json.loads(r1.read())["role"] == "admin"
        c.request("GET", "/api/whoami")
        r2 = c.getresponse()
        assert r2.status == 401, r2.read()
        r2.read()
    finally:
        c.close()


def test_a_followed_stream_ends_when_its_user_is_removed(api: Api) -> None:
    """A quiet stream (a job that prints nothing) is still re-checked: the removed user's follow ends."""
    token = add_user(api.cluster, "tom", "viewer")
    name = api.run("sleepy")
    try:
        c = api.conn(timeout=120)
        c.request(
            "GET",
            f"/api/runs/{name}/logs/stream",
            headers={"Authorization": f"Bearer {token}", "Accept": "text/event-stream"},
        )
        r = c.getresponse()
        assert r.status == 200
        removed = api.cluster.cli("users", "remove", "tom")
        assert removed.returncode == 0, removed.stderr
        events = list(sse_events(r))  # ends when the server closes the stream
        assert events and events[-1][0] == "error", events
        assert "revoked" in json.loads(events[-1][2])["error"]["message"]
        c.close()
        assert api.get(f"/api/runs/{name}", token)[0] == 401
    finally:
        api.cluster.cli("stop", name)


def test_queue_shows_order_reasons_and_metrics_the_depth(api: Api) -> None:
    """Two runs that need both GPUs: one runs, one waits and says why; the GPUs show as held."""
    first, second = api.run("two"), api.run("two")
    try:
        api.cluster.wait_status(first, {"running"}, timeout=120)
        jobs = wait_for(
            lambda: q if (q := api.json("/api/queue", "viewer")["jobs"]) and q[0]["message"] else None,
            timeout=60,
            what="the waiting job's reason",
        )
        assert [(j["run_name"], j["owner"], j["position"]) for j in jobs] == [(second, "admin", 1)], jobs
        assert jobs[0]["status"] in ("submitted", "pending") and jobs[0]["reason"], jobs
        run = api.json(f"/api/runs/{second}", "viewer")
        assert run["jobs"][0]["queue_position"] == 1 and run["jobs"][0]["message"] == jobs[0]["message"]
        m = metrics(api, api.tokens["viewer"])
        assert m["dstack_queue_depth,user=admin"] == 1
        held = [v for k, v in m.items() if k.startswith("dstack_gpu_allocated,agent=agent-1,")]
        assert held == [1, 1]
        assert m["dstack_jobs,status=running"] >= 1
    finally:
        for name in (first, second):
            api.cluster.cli("stop", name)


def test_an_open_stream_does_not_hold_up_the_coordinators_stop(cluster: Cluster, tmp_path: Path) -> None:
    port = free_port()
    cluster.start_coordinator("--http-port", str(port))
    cluster.start_agent()
    project = write_project(
        tmp_path / "p", "workflows:\n  - name: quiet\n    provider: bash\n    commands: [sleep 600]\n"
    )
    r = cluster.cli("run", "-d", "quiet", cwd=project)
    assert r.returncode == 0, r.stderr
    name = r.stdout.strip()
    cluster.wait_status(name, {"running"}, timeout=120)
    ctx = ssl.create_default_context(cafile=str(cluster.ca_file))
    c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=120)
    c.request("GET", f"/api/runs/{name}/logs/stream", headers={"Authorization": f"Bearer {cluster.admin_token}"})
    resp = c.getresponse()
    assert resp.status == 200
    assert cluster.coordinator is not None
    cluster.coordinator.popen.terminate()
    assert cluster.coordinator.popen.wait(timeout=60) == 0, cluster.coordinator.output()[-2000:]
    list(sse_events(resp))  # the stream ends with the server
    c.close()
