"""TLS between the CLI, the agents and the coordinator, tried as an attacker on the network would.

A recording TCP proxy sits between each client and the coordinator and keeps every byte both ways: over TLS
no token or secret crosses it readable, while the same session with --insecure on both sides shows them all
(which proves the proxy records what it should). Then the ways TLS can be got wrong: a wrong fingerprint,
plaintext against TLS and TLS against plaintext, a restart (the CA must stay, agents reconnect), an admin's
own certificate, and the modes of the files that hold keys.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import threading
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from dstack.coordinator.tls import make_ca, make_server_cert
from dstack.protos.v1 import client_pb2, client_pb2_grpc
from dstack.tls import fingerprint
from tests.conftest import PY, REPO, Cluster, Proc, free_port, search, wait_for, write_project

pytestmark = pytest.mark.integration

SECRET = "tls-secret-" + secrets.token_hex(12)
WRONG_FINGERPRINT = "SHA256:" + "ab" * 32


class RecordingProxy:
    """A TCP proxy that forwards each connection to `upstream` and records every byte, both ways."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.lock = threading.Lock()
        self.to_server = bytearray()
        self.to_client = bytearray()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, up, self.to_server), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, client, self.to_client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        try:
            while data := src.recv(65536):
                with self.lock:
                    record.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def recorded(self) -> bytes:
        with self.lock:
            return bytes(self.to_server) + bytes(self.to_client)

    def close(self) -> None:
        self.server.close()


def unique_tokens(cluster: Cluster) -> None:
    cluster.admin_token = "admin-" + secrets.token_hex(16)
    cluster.join_token = "join-" + secrets.token_hex(16)


def env_via(cluster: Cluster, address: str, home: Path | None = None) -> dict[str, str]:
    env = {**cluster.env(), "DSTACK_COORDINATOR": address}
    if home is not None:
        env["DSTACK_HOME"] = str(home)
    return env


def cli(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "dstack.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


def no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr, r.stderr


def record_session(cluster: Cluster, tmp_path: Path) -> tuple[bytes, list[str]]:
    """A whole session through two recording proxies: secrets, a run that uses one, its logs, and an agent
    that registers and takes the job. Returns the bytes recorded and the credentials that must not show."""
    unique_tokens(cluster)
    cluster.start_coordinator()
    cli_proxy, agent_proxy = RecordingProxy(cluster.address), RecordingProxy(cluster.address)
    try:
        cluster.start_agent("agent-1", "--coordinator", agent_proxy.address)
        env = env_via(cluster, cli_proxy.address)
        r = cli(env, "secrets", "add", "TOP_SECRET", SECRET)
        assert r.returncode == 0, r.stderr
        root = write_project(
            tmp_path / "p",
            """
            workflows:
              - name: leak
                provider: bash
                commands:
                  - echo "the secret is $TOP_SECRET"
                  - test "${#TOP_SECRET}" -eq 35 && echo "and it has 35 characters"
            """,
        )
        r = cli(env, "run", "leak", cwd=root)
        assert r.returncode == 0, r.stderr
        assert "and it has 35 characters" in r.stdout
        name = search(r"(\S+) submitted", r.stderr).group(1)
        r = cli(env, "logs", name)
        assert r.returncode == 0 and "the secret is" in r.stdout, r.stderr
        agent_token = json.loads((cluster.tmp / "agent-1" / "agent.json").read_text())["agent_token"]
        assert cli_proxy.connections and agent_proxy.connections
        return cli_proxy.recorded() + agent_proxy.recorded(), [
            cluster.admin_token,
            cluster.join_token,
            agent_token,
            SECRET,
        ]
    finally:
        cli_proxy.close()
        agent_proxy.close()


def test_a_recorded_tls_session_shows_no_token_and_no_secret(cluster: Cluster, tmp_path: Path) -> None:
    recorded, credentials = record_session(cluster, tmp_path)
    assert len(recorded) > 10_000  # the proxies carried the session
    for value in credentials:
        assert value.encode() not in recorded


def test_the_same_session_with_insecure_on_both_sides_shows_them_all(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, free_port(), tls=False)
    try:
        recorded, credentials = record_session(cluster, tmp_path)
    finally:
        cluster.stop_all()
    for value in credentials:  # the proxy records what crosses it: plaintext gives every credential away
        assert value.encode() in recorded, value
    assert "PLAINTEXT" in cluster.coordinator.output() if cluster.coordinator else False
    assert "warning" in (cluster.tmp / "agent-1.log").read_text()


def test_a_wrong_fingerprint_is_refused_before_anything_is_sent(cluster: Cluster, tmp_path: Path) -> None:
    unique_tokens(cluster)
    cluster.start_coordinator()
    proxy = RecordingProxy(cluster.address)
    home = tmp_path / "home"
    env = {k: v for k, v in env_via(cluster, "", home).items() if k not in ("DSTACK_COORDINATOR", "DSTACK_CA_FILE")}
    r = cli(
        env,
        "config",
        "--coordinator",
        proxy.address,
        "--token",
        cluster.admin_token,
        "--ca-fingerprint",
        WRONG_FINGERPRINT,
    )
    assert r.returncode == 1
    assert "does not match the pinned CA" in r.stderr
    assert fingerprint(cluster.ca_file.read_bytes()) in r.stderr  # what it presented, to compare by eye
    no_traceback(r)
    assert not (home / "config.yaml").exists() and not (home / "coordinator-ca.pem").exists()

    # An agent with the wrong fingerprint stops with the same words, and registers nowhere.
    agent = cluster.start_agent(
        "wrong", "--coordinator", proxy.address, "--ca-fingerprint", WRONG_FINGERPRINT, wait=False
    )
    assert agent.popen.wait(60) == 2
    assert "does not match the pinned CA" in agent.output()
    assert not (cluster.tmp / "wrong" / "agent.json").exists()
    assert not (cluster.tmp / "wrong" / "coordinator-ca.pem").exists()
    recorded = proxy.recorded()
    assert proxy.connections >= 2
    for value in (cluster.admin_token, cluster.join_token):
        assert value.encode() not in recorded
    proxy.close()


def test_the_right_fingerprint_pins_the_ca_for_the_cli_and_the_agent(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    fp = fingerprint(cluster.ca_file.read_bytes())
    banner = cluster.coordinator.output() if cluster.coordinator else ""
    assert f"TLS CA fingerprint: {fp}" in banner
    assert f"dstack agent --coordinator 127.0.0.1:{cluster.port} --ca-fingerprint {fp} --join-token-file" in banner

    home = tmp_path / "home"
    env = {k: v for k, v in env_via(cluster, "", home).items() if k not in ("DSTACK_COORDINATOR", "DSTACK_CA_FILE")}
    # The fingerprint as openssl prints it (upper case, colons) is accepted too.
    openssl_style = "SHA256:" + ":".join(fp[7:][i : i + 2].upper() for i in range(0, 64, 2))
    r = cli(
        env,
        "config",
        "--coordinator",
        cluster.address,
        "--token",
        cluster.admin_token,
        "--ca-fingerprint",
        openssl_style,
    )
    assert r.returncode == 0, r.stderr
    assert f"CA {fp} pinned" in r.stdout
    pinned = home / "coordinator-ca.pem"
    assert pinned.read_bytes().strip() == cluster.ca_file.read_bytes().strip()
    assert pinned.stat().st_mode & 0o777 == 0o600
    r = cli(env, "ps")
    assert r.returncode == 0, r.stderr
    assert "TLS, CA pinned in" in cli(env, "config").stdout

    cluster.start_agent("pinned", "--ca-fingerprint", fp)
    agent_ca = cluster.tmp / "pinned" / "coordinator-ca.pem"
    assert agent_ca.read_bytes().strip() == cluster.ca_file.read_bytes().strip()
    assert agent_ca.stat().st_mode & 0o777 == 0o600


def test_plaintext_and_tls_that_do_not_match_fail_clearly(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    plain = {**cluster.env(), "DSTACK_INSECURE": "1"}
    del plain["DSTACK_CA_FILE"]
    r = cli(plain, "ps")
    assert r.returncode == 1
    assert f"the coordinator at {cluster.address} speaks TLS" in r.stderr and "--ca-file" in r.stderr
    no_traceback(r)

    # No CA at all: the system's roots do not know the coordinator's private CA.
    unpinned = {k: v for k, v in cluster.env().items() if k != "DSTACK_CA_FILE"}
    r = cli(unpinned, "ps")
    assert r.returncode == 1
    assert "speaks TLS with a certificate this CLI does not trust" in r.stderr and "--ca-fingerprint" in r.stderr
    no_traceback(r)

    # Another coordinator's CA: refused as not the pinned one.
    other = tmp_path / "other-ca.pem"
    other.write_bytes(make_ca()[1].public_bytes(serialization.Encoding.PEM))
    r = cli({**cluster.env(), "DSTACK_CA_FILE": str(other)}, "ps")
    assert r.returncode == 1 and "does not match the pinned CA" in r.stderr
    no_traceback(r)

    # An agent without --insecure against this TLS coordinator, told plaintext: stops and says why.
    agent = cluster.start_agent("plain", "--insecure", wait=False)
    assert agent.popen.wait(60) == 2
    assert "speaks TLS, and this agent has --insecure" in agent.output()

    # And the other way round: a plaintext coordinator, and clients that expect TLS.
    assert cluster.coordinator is not None
    cluster.coordinator.terminate()
    cluster.tls = False
    cluster.start_coordinator()
    r = cli({**cluster.env(), "DSTACK_INSECURE": "", "DSTACK_CA_FILE": str(cluster.ca_file)}, "ps")
    assert r.returncode == 1 and f"the coordinator at {cluster.address} does not speak TLS" in r.stderr
    no_traceback(r)
    agent = cluster.start_agent("tls", "--ca-file", str(cluster.ca_file), wait=False)
    assert agent.popen.wait(60) == 2
    assert "does not speak TLS" in agent.output()


def test_the_tls_coordinator_does_not_answer_plaintext(cluster: Cluster) -> None:
    cluster.start_coordinator()
    # An HTTP/2 client preface and a SETTINGS frame, as a plaintext gRPC client starts.
    with socket.create_connection(("127.0.0.1", cluster.port), timeout=10) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        answer = b""
        try:
            while chunk := s.recv(4096):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    # Nothing, or a TLS alert record (0x15): never an HTTP/2 frame.
    assert answer == b"" or answer[0] == 0x15, answer[:32]
    channel = grpc.insecure_channel(cluster.address)
    with pytest.raises(grpc.RpcError) as e:
        client_pb2_grpc.ClientServiceStub(channel).GetInfo(
            client_pb2.GetInfoRequest(), metadata=[("authorization", f"Bearer {cluster.admin_token}")], timeout=10
        )
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()


def test_a_restarted_coordinator_keeps_its_ca_and_agents_reconnect(cluster: Cluster) -> None:
    cluster.start_coordinator()
    fp = fingerprint(cluster.ca_file.read_bytes())
    server_cert = (cluster.tmp / "server" / "tls" / "server.pem").read_bytes()
    cluster.start_agent("a1", "--ca-fingerprint", fp)
    assert cluster.coordinator is not None
    cluster.coordinator.terminate()
    cluster.start_coordinator()
    assert fingerprint(cluster.ca_file.read_bytes()) == fp
    assert (cluster.tmp / "server" / "tls" / "server.pem").read_bytes() == server_cert  # still good: kept
    wait_for(
        lambda: any(a["name"] == "a1" and a["status"] == "online" for a in cluster.agents_json()),
        timeout=60,
        what="the agent to reconnect",
    )
    # A new name for the certificate: a new server certificate, the same CA.
    cluster.coordinator.terminate()
    cluster.start_coordinator("--tls-san", "gpu-pool.example.com")
    assert fingerprint(cluster.ca_file.read_bytes()) == fp
    assert (cluster.tmp / "server" / "tls" / "server.pem").read_bytes() != server_cert
    assert "made a new server certificate" in cluster.coordinator.output()
    wait_for(
        lambda: any(a["name"] == "a1" and a["status"] == "online" for a in cluster.agents_json()),
        timeout=60,
        what="the agent to reconnect to the new certificate",
    )


def test_tls_files_are_the_owners_only(cluster: Cluster) -> None:
    cluster.start_coordinator()
    tls = cluster.tmp / "server" / "tls"
    assert tls.stat().st_mode & 0o777 == 0o700
    for name in ("ca.key", "server.key", "ca.pem", "server.pem"):
        assert (tls / name).stat().st_mode & 0o777 == 0o600, name
    # A key made readable by others is tightened at the next start.
    (tls / "ca.key").chmod(0o644)
    assert cluster.coordinator is not None
    cluster.coordinator.terminate()
    cluster.start_coordinator()
    assert (tls / "ca.key").stat().st_mode & 0o777 == 0o600


def test_an_admins_own_certificate_is_verified_as_usual(cluster: Cluster, tmp_path: Path) -> None:
    ca_key, ca = make_ca("Example Corp Root")
    key, cert = make_server_cert(ca_key, ca, {"127.0.0.1", "localhost"})
    pem = serialization.Encoding.PEM
    (tmp_path / "admin-ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "chain.pem").write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    key_file = tmp_path / "server.key"
    key_file.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key_file.chmod(0o600)
    # The CLI verifies 127.0.0.1 against the admin's CA, by name, without the private CA's fixed name.
    env = {**cluster.env(), "DSTACK_CA_FILE": str(tmp_path / "admin-ca.pem")}
    log = cluster.tmp / "coordinator.log"
    with log.open("ab") as f:
        popen = subprocess.Popen(
            [
                *(PY, "-m", "dstack.coordinator", "--state-dir", str(cluster.tmp / "server")),
                *("--listen", cluster.address, "--tls-cert", str(tmp_path / "chain.pem"), "--tls-key", str(key_file)),
            ],
            stdout=f,
            stderr=f,
            env={**os.environ, "DSTACK_ADMIN_TOKEN": cluster.admin_token, "DSTACK_JOIN_TOKEN": cluster.join_token},
            cwd=REPO,
        )
    cluster.coordinator = Proc(popen, log)
    wait_for(lambda: cli(env, "ps").returncode == 0, what="the coordinator with the admin's certificate")
    assert not (cluster.tmp / "server" / "tls" / "ca.key").exists()  # no private CA was made
    assert f"TLS CA fingerprint: {fingerprint(ca.public_bytes(pem))}" in cluster.coordinator.output()
    cluster.start_agent("admin-ca", "--ca-file", str(tmp_path / "admin-ca.pem"), wait=False)
    wait_for(
        lambda: '"status": "online"' in cli(env, "agents", "--json").stdout.replace('":"', '": "'),
        what="the agent that verified the admin's certificate online",
    )
