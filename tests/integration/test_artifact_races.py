"""A hostile job against artifact collection: with `mount: true` the agent collects its folder again and
again while it runs, and the job swaps a file (and a folder) for a symlink to a secret outside it in a
tight loop, hoping that one collection checks the file and then opens the symlink. No byte of the secret
may reach the store."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import pytest

from tests.conftest import Cluster, wait_for, write_project

pytestmark = pytest.mark.integration

SWAPPER = """
import os, sys, time

secret_file, secret_dir = sys.argv[1], sys.argv[2]
os.makedirs("out", exist_ok=True)
with open("out/steady.txt", "w") as f:
    f.write("steady\\n")
print("swapping", flush=True)
# Every round a new name, a regular file for a moment, then a symlink to the secret, and never touched
# again: an upload that checked the file and then opened the symlink would stay in the store.
end, i = time.monotonic() + 20, 0  # the workload: 20 s of swaps while the agent collects
while time.monotonic() < end:
    f, d = f"out/f{i}", f"out/d{i}"
    with open(f, "w") as fh:
        fh.write("harmless\\n")
    os.symlink(secret_file, "out/.l")
    os.replace("out/.l", f)  # the file is now a symlink to the secret
    os.mkdir(d)
    with open(f"{d}/s", "w") as fh:
        fh.write("harmless\\n")
    os.symlink(secret_dir, "out/.dl")
    os.unlink(f"{d}/s")
    os.rmdir(d)
    os.replace("out/.dl", d)  # and the folder a symlink to the secret's folder
    if i >= 5:  # a few at a time: the folder stays small
        os.unlink(f"out/f{i - 5}")
        os.unlink(f"out/d{i - 5}")
    i += 1
for name in os.listdir("out"):
    if name != "steady.txt":
        os.unlink(f"out/{name}")
print(f"swaps={i}", flush=True)
"""


def test_swapping_files_for_symlinks_never_uploads_the_secret(cluster: Cluster, tmp_path: Path) -> None:
    token = secrets.token_hex(16)
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "f").write_text(f"SECRET-{token}\n" * 1000)
    (secret_dir / "s").write_text(f"SECRET-{token}\n")
    cluster.start_coordinator()
    cluster.start_agent("agent-1", "--mount-sync", "0.05")
    root = write_project(
        tmp_path / "p",
        f"""
        workflows:
          - name: swap
            provider: bash
            commands:
              - {sys.executable} swap.py {secret_dir / "f"} {secret_dir}
            artifacts:
              - path: out
                mount: true
        """,
        {"swap.py": SWAPPER},
    )
    name = cluster.cli("run", "-d", "swap", cwd=root).stdout.strip()

    # The agent does collect while the job swaps (not only once it is over): it skips the symlinks.
    agent_log = tmp_path / "agent-1.log"
    wait_for(lambda: "symlink" in agent_log.read_text(), timeout=30, what="a mounted collection during the swaps")
    assert cluster.run_info(name)["status"] == "running"
    info = cluster.wait_status(name, {"done", "failed"}, timeout=90)
    assert info["status"] == "done", info
    logs = cluster.cli("logs", name).stdout
    assert "swaps=" in logs and int(logs.split("swaps=")[1].split()[0]) > 100, logs

    out = tmp_path / "download"
    assert cluster.cli("artifacts", "download", name, "-o", str(out)).returncode == 0
    got = {p.relative_to(out).as_posix(): p.read_text() for p in out.rglob("*") if p.is_file()}
    assert got == {"out/steady.txt": "steady\n"}
    # Every object the store received: those of files gone by the end stay there.
    stored = [p for p in (tmp_path / "server" / "storage" / "runs").rglob("*") if p.is_file()]
    assert stored
    for p in stored:
        assert token.encode() not in p.read_bytes(), f"{p} holds the secret"
