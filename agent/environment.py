"""What a job ran with, for the run's record (docs/reproducibility.md): sent with the job's final update.

The runner times each phase (code, inputs, pulling, setup, running, uploading); the runtime says what
it started (the image by ID and digests, or the host's OS and Python); the job's Python environment
reports what `requirements` resolved to (`pip freeze`, written by env_helper.py into a file in the job's
folder at the end of its setup). That file is the job's to write, so it is read like anything a job
hands the agent: not through a link, bounded in size, and parsed without trusting its shape.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dstack.agent.runtimes.base import REPORT_FILE, REPORT_VAR
from dstack.protos.v1 import common_pb2

__all__ = ["REPORT_FILE", "REPORT_VAR", "EnvironmentRecorder", "cached_host_facts", "host_facts", "read_report_file"]
MAX_REPORT_BYTES = 512 * 1024
MAX_PACKAGES = 256 * 1024  # characters of `pip freeze` kept; the coordinator bounds it again
MAX_FIELD = 256
AGENT_VERSION = "0.1.0"


class EnvironmentRecorder:
    def __init__(self, runtime: str) -> None:
        self.env = common_pb2.JobEnvironment(runtime=runtime, agent_version=AGENT_VERSION)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.monotonic_ns()
        try:
            yield
        finally:
            self.add_time(name, time.monotonic_ns() - started)

    def add_time(self, name: str, ns: int) -> None:
        self.env.phase_ns[name] = self.env.phase_ns.get(name, 0) + max(0, ns)

    def set_gpus(self, gpus: list[common_pb2.GpuInfo], versions: tuple[str, str]) -> None:
        for g in gpus:
            self.env.gpus.add(
                index=g.index, uuid=g.uuid, name=g.name, memory_total_bytes=g.memory_total_bytes, simulated=g.simulated
            )
        self.env.driver_version, self.env.cuda_version = versions

    def set_runtime_facts(self, facts: dict[str, Any]) -> None:
        """What the runtime said it started (JobProcess.environment)."""
        for key in ("image", "image_id", "os"):  # only what it said: a host process leaves the host's facts
            if facts.get(key):
                setattr(self.env, key, str(facts[key])[:MAX_FIELD])
        digests = facts.get("image_digests") or []
        self.env.image_digests[:] = [str(d)[:MAX_FIELD] for d in list(digests)[:16]]

    def read_report(self, workdir: Path) -> None:
        """Reads and removes the report the job's environment wrote (blocking: run it in a thread)."""
        report = read_report_file(workdir / REPORT_FILE)
        with contextlib.suppress(OSError):
            (workdir / REPORT_FILE).unlink()  # not an artifact of the job
        if report is None:
            return
        version = report.get("python_version")
        if isinstance(version, str):
            self.env.python_version = version[:64]
        packages = report.get("packages")
        if isinstance(packages, str):
            self.env.packages = packages[:MAX_PACKAGES]
            self.env.packages_truncated = len(packages) > MAX_PACKAGES or bool(report.get("packages_truncated"))
        setup = report.get("setup_ns")
        running = self.env.phase_ns.get("running", 0)
        if isinstance(setup, int) and 0 < setup <= running:  # inside the job's running time: said apart
            self.env.phase_ns["running"] = running - setup
            self.add_time("environment", setup)
        if not self.env.os and isinstance(report.get("os"), str):
            self.env.os = report["os"][:MAX_FIELD]


def read_report_file(path: Path) -> dict[str, Any] | None:
    """The report as a JSON object, or None: missing, a link (symbolic or hard) or not a regular file (a
    job could point it at a file only the agent may read), too large, or not a JSON object."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:  # a hard link could be another's file
            return None
        data = f.read(MAX_REPORT_BYTES + 1)
    if len(data) > MAX_REPORT_BYTES:
        return None
    try:
        value = json.loads(data.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# What host_facts found, by interpreter, and when: the OS and an interpreter's version do not change
# from one job to the next, and asking costs a thread hop and a Python start (tens of ms) per job.
# Kept a minute, so that an upgraded interpreter shows in the records soon (a python job's own
# environment reports its version anyway, read_report).
FACTS_TTL_S = 60.0
_facts: dict[str, tuple[float, dict[str, str]]] = {}


def cached_host_facts(python: str) -> dict[str, str] | None:
    """host_facts(python) as found less than FACTS_TTL_S ago, or None (without blocking)."""
    hit = _facts.get(python)
    if hit is None or time.monotonic() - hit[0] > FACTS_TTL_S:
        return None
    return dict(hit[1])


@functools.cache
def _platform() -> str:
    return platform.platform()  # reads the interpreter's binary (libc_ver): once per agent


def host_facts(python: str) -> dict[str, str]:
    """The host runtime's OS and the Python a job would run ("": none asked; blocking)."""
    facts = _host_facts(python)
    _facts[python] = (time.monotonic(), facts)
    return dict(facts)


def _host_facts(python: str) -> dict[str, str]:
    facts = {"os": _platform()}
    if not python:
        return facts
    try:
        out = subprocess.run(
            [python, "-c", "import platform; print(platform.python_version())"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        if out.returncode == 0:
            facts["python_version"] = out.stdout.strip()[:64]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return facts
