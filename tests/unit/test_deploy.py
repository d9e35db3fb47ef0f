"""deploy/install.sh: syntax, and its checks in dry-run mode, with fake tools on a PATH of our own."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "install.sh"
# What the script itself runs in a dry run; everything else it looks for (python3, nvidia-smi,
# docker, nvidia-ctk, apt-get, systemctl) is a fake or absent.
TOOLS = ["bash", "dirname", "id", "sed", "grep", "head", "mktemp", "chmod", "mv", "cat"]


class FakeHost:
    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.bin.mkdir()
        for tool in TOOLS:
            real = shutil.which(tool)
            assert real is not None, tool
            (self.bin / tool).symlink_to(real)
        self.python("3.11")

    def tool(self, name: str, script: str = "exit 0") -> None:
        path = self.bin / name
        path.write_text(f"#!{shutil.which('bash')}\n{script}\n")
        path.chmod(0o755)

    def python(self, version: str) -> None:
        # Answers the version question; every other call (import ensurepip, venv) succeeds.
        self.tool("python3", f'case "$*" in *version_info*) echo {version} ;; esac')

    def gpus(self, n: int) -> None:
        lines = "\n".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})" for i in range(n))
        self.tool("nvidia-smi", f"cat <<'EOF'\n{lines}\nEOF")

    def install(self, *args: str, token: str | None = "the-secret-token") -> subprocess.CompletedProcess[str]:
        env = {"PATH": str(self.bin), "DSTACK_INSTALL_DRY_RUN": "1", "HOME": str(self.bin.parent)}
        if token is not None:
            env["DSTACK_JOIN_TOKEN"] = token
        return subprocess.run(
            [str(self.bin / "bash"), str(SCRIPT), *args],
            capture_output=True,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=30,
        )


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


def test_the_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="no shellcheck here")
def test_shellcheck_is_clean() -> None:
    r = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_an_old_python_stops_the_install_before_any_change(host: FakeHost) -> None:
    host.python("3.9")
    r = host.install("coordinator")
    assert r.returncode == 1
    assert "dstack needs Python 3.11 or newer, and python3 is 3.9" in r.stderr
    assert "would run" not in r.stdout


def test_a_dry_run_says_what_it_would_do_and_apt_updates_first(host: FakeHost) -> None:
    host.tool("python3", 'case "$*" in *version_info*) echo 3.12 ;; *ensurepip*) exit 1 ;; esac')
    host.tool("apt-get")
    r = host.install("coordinator", "0.0.0.0", "3000", "--retention-days", "30")
    assert r.returncode == 0, r.stderr
    steps = [line.removeprefix("would run: ") for line in r.stdout.splitlines() if line.startswith("would run: ")]
    assert steps[:3] == [
        "apt-get update -q",
        "apt-get install -y -q python3.12-venv",
        "python3 -m venv /opt/dstack/venv",
    ]
    assert 'would set in /etc/dstack/coordinator.env: DSTACK_SERVER_ARGS="--retention-days 30"' in r.stdout
    assert "systemctl enable --now dstack-coordinator" in steps


def test_the_join_token_never_goes_on_the_command_line_nor_into_the_output(host: FakeHost, tmp_path: Path) -> None:
    r = host.install("agent", "srv:3000", "the-secret-token")
    assert r.returncode == 1 and "the join token is not an argument" in r.stderr
    r = host.install("agent", "srv:3000", "--join-token", "the-secret-token")
    assert r.returncode == 1 and "do not pass the join token on the command line" in r.stderr
    assert host.install("agent", "srv:3000", token=None).returncode == 1  # none at all, and no terminal to ask
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    r = host.install("agent", "srv:3000", "--join-token-file", str(token_file), "--name", "gpu-7", token=None)
    assert r.returncode == 0, r.stderr
    assert "would set in /etc/dstack/agent.env: DSTACK_JOIN_TOKEN=***" in r.stdout
    assert 'DSTACK_AGENT_ARGS="--name gpu-7"' in r.stdout
    r = host.install("agent", "srv:3000")
    assert r.returncode == 0, r.stderr
    assert "the-secret-token" not in r.stdout + r.stderr


def test_gpus_with_docker_need_the_nvidia_container_toolkit(host: FakeHost) -> None:
    host.gpus(8)
    host.tool("docker")
    for runtime in (["--runtime", "docker"], []):  # auto picks Docker when it is installed
        r = host.install("agent", "srv:3000", *runtime)
        assert r.returncode == 1, r.stdout
        assert "8 NVIDIA GPU(s) found" in r.stderr
        assert "the NVIDIA container toolkit is missing" in r.stderr
        assert "apt-get install -y nvidia-container-toolkit" in r.stderr and "--runtime host" in r.stderr
        assert "would run" not in r.stdout
    assert host.install("agent", "srv:3000", "--runtime", "host").returncode == 0
    host.tool("nvidia-ctk")
    r = host.install("agent", "srv:3000", "--runtime", "docker")
    assert r.returncode == 0, r.stderr
    assert "--docker-image-cuda" in r.stderr  # what the images are, and how to change them


def test_no_gpus_and_no_docker_is_fine_and_said(host: FakeHost) -> None:
    r = host.install("agent", "srv:3000")
    assert r.returncode == 0, r.stderr
    assert "no NVIDIA driver here" in r.stderr
    assert "Docker is not installed: jobs run as host processes" in r.stderr
    r = host.install("agent", "srv:3000", "--runtime", "docker")
    assert r.returncode == 1 and "Docker is not installed" in r.stderr


def test_env_files_keep_lines_added_by_hand(tmp_path: Path) -> None:
    env = tmp_path / "coordinator.env"
    env.write_text("DSTACK_HOST=127.0.0.1\nAWS_ACCESS_KEY_ID=key\n")
    subprocess.run(
        ["bash", "-c", f'source {SCRIPT} && set_env {env} "" DSTACK_HOST=0.0.0.0 DSTACK_PORT=3000'],
        check=True,
        env={**os.environ, "DSTACK_INSTALL_DRY_RUN": "0"},
    )
    assert env.read_text() == "AWS_ACCESS_KEY_ID=key\nDSTACK_HOST=0.0.0.0\nDSTACK_PORT=3000\n"
    assert env.stat().st_mode & 0o777 == 0o600


UNITS = sorted((REPO / "deploy" / "systemd").glob("*.service"))
TOKEN_IN_ARGV = re.compile(r"--(join-)?token\b(?!-file)|\$\{?DSTACK_(JOIN|ADMIN)_TOKEN\b|\$\{?DSTACK_TOKEN\b")


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_no_unit_puts_a_token_in_argv(unit: Path) -> None:
    text = unit.read_text()
    [exec_start] = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    assert not TOKEN_IN_ARGV.search(exec_start), exec_start
    assert re.search(r"^EnvironmentFile=-?/etc/dstack/\S+\.env$", text, re.M)


def test_the_coordinator_unit_creates_files_for_its_user_only() -> None:
    assert "UMask=0077" in (REPO / "deploy" / "systemd" / "dstack-coordinator.service").read_text()


@pytest.mark.parametrize("doc", ["README.md", "deploy/README.md"])
def test_the_docs_show_no_token_in_argv(doc: str) -> None:
    """A command someone copies keeps its token out of ps and shell history."""
    text = (REPO / doc).read_text()
    assert not re.search(r"--(join-)?token[ =](?!-)[A-Z.$]", text), re.findall(r".*--(?:join-)?token[ =].*", text)


def test_the_install_passes_the_token_in_the_environment_file_not_in_the_agent_options(
    host: FakeHost, tmp_path: Path
) -> None:
    r = host.install("agent", "srv:3000", "--name", "gpu-7")
    assert r.returncode == 0, r.stderr
    [args] = [line for line in r.stdout.splitlines() if "DSTACK_AGENT_ARGS=" in line]
    assert "token" not in args.lower()
    for bad in (["--join-token=x"], ["--token", "x"], ["--token=x"]):
        r = host.install("agent", "srv:3000", *bad)
        assert r.returncode == 1 and "do not pass the join token on the command line" in r.stderr
        assert "would run" not in r.stdout


def test_the_agent_install_pins_the_coordinators_ca(host: FakeHost, tmp_path: Path) -> None:
    fp = "SHA256:" + "ab" * 32
    r = host.install("agent", "srv:3000", "--ca-fingerprint", fp)
    assert r.returncode == 0, r.stderr
    assert f'DSTACK_AGENT_ARGS="--ca-fingerprint {fp}"' in r.stdout
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    r = host.install("agent", "srv:3000", "--ca-file", str(ca))
    assert r.returncode == 0, r.stderr
    assert f"would run: install -m 0644 {ca} /etc/dstack/coordinator-ca.pem" in r.stdout
    assert 'DSTACK_AGENT_ARGS="--ca-file /etc/dstack/coordinator-ca.pem"' in r.stdout
    r = host.install("agent", "srv:3000")  # neither: said, as only a public CA's certificate would verify
    assert r.returncode == 0 and "no --ca-fingerprint or --ca-file" in r.stderr
    r = host.install("agent", "srv:3000", "--insecure")
    assert r.returncode == 0 and "PLAINTEXT" in r.stderr


def test_the_coordinator_install_prints_the_ca_fingerprint(host: FakeHost) -> None:
    r = host.install("coordinator")
    assert r.returncode == 0, r.stderr
    assert "would print the fingerprint of /var/lib/dstack/server/tls/ca.pem" in r.stderr
    r = host.install("coordinator", "0.0.0.0", "3000", "--insecure")
    assert r.returncode == 0 and "PLAINTEXT" in r.stderr
