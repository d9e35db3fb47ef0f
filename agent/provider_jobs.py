"""The jobs a 2022 custom provider program produced (issue 13 item 9), read when its job exits 0.

A providers.yaml entry's program (JobSpec.provider_program) imports the `dstack` module of
agent/provider_compat (put on its PYTHONPATH read-only: host runtime by path, docker by a read-only
mount), whose `Provider.start()` writes the jobs of `create_jobs()` as JSON to $DSTACK_PROVIDER_JOBS_FILE
in the job's own folder. 2022's `start()` posted them to dstack's server with the user's token; here the
job holds no credential and sends nothing: the agent reads the file and reports the jobs with the job's
DONE, and the coordinator checks them as it checks a submission (coordinator/app/provided_jobs.py).

Nothing in the file is trusted: it is the job's own writing. It is opened without following a link (a
link to an agent file is refused), read up to MAX_BYTES, and each field is type-checked; anything
wrong fails the job with a message that says what.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from dstack.protos.v1 import common_pb2

JOBS_VAR = "DSTACK_PROVIDER_JOBS_FILE"
JOBS_FILE = ".dstack-provider-jobs.json"  # in the job's folder (the code root), removed with it
COMPAT_DIR = Path(__file__).resolve().parent / "provider_compat"  # holds the `dstack` package it imports
COMPAT_MOUNT = "/opt/dstack-provider-compat"  # where a container sees it (read-only)
MAX_BYTES = 1 << 20
MAX_JOBS = 64  # as many as a gang may have members (coordinator/gangs.py MAX_NODES)
MAX_COMMANDS = 1000
MAX_STRING = 64 * 1024
MAX_ENV = 1000

_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]?I?B?)\s*", re.IGNORECASE)
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}


class ProvidedJobsError(ValueError):
    """The program's job list cannot be used; the message says why (it becomes the job's failure)."""


def provider_env(env: dict[str, str], job_root: str, compat_dir: str) -> dict[str, str]:
    """The environment of a provider program's job: where to write its jobs, and the compat `dstack` first on
    its PYTHONPATH (the program imports it; a `dstack` of the job's own image comes after)."""
    path = [compat_dir, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    # Also as the user site (COMPAT_DIR/lib/python3.X/site-packages/dstack link to it), which comes before the
    # image's site-packages and survives a command that sets PYTHONPATH itself, as ivan-bokov's torchrun
    # entry does (`PYTHONPATH=providers python3 providers/torchrun/main.py`).
    return env | {JOBS_VAR: f"{job_root}/{JOBS_FILE}", "PYTHONPATH": ":".join(path), "PYTHONUSERBASE": compat_dir}


def read_jobs_file(workdir: Path) -> bytes | None:
    """The file's bytes (None: the program wrote none), bounded, never through a link. Blocking: call it
    in a thread."""
    try:
        fd = os.open(workdir / JOBS_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ProvidedJobsError(f"{JOBS_FILE} is a link; the provider's jobs must be a file it wrote") from None
        raise ProvidedJobsError(f"cannot read {JOBS_FILE}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # a FIFO or device would never end
            raise ProvidedJobsError(f"{JOBS_FILE} is not a regular file")
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise ProvidedJobsError(f"{JOBS_FILE} is larger than {MAX_BYTES} bytes")
    return data


def parse_jobs(data: bytes, parent: common_pb2.JobSpec) -> list[common_pb2.JobSpec]:
    """The job specs the file describes, named `PARENT-1`, `PARENT-2`, ... (2022 provider jobs had no names),
    in the parent's workflow, each field checked for its type and size."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ProvidedJobsError(f"{JOBS_FILE} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list):
        raise ProvidedJobsError(f'{JOBS_FILE} must be {{"jobs": [...]}}')
    items: list[Any] = doc["jobs"]
    if not items:
        raise ProvidedJobsError("create_jobs() returned no jobs")
    if len(items) > MAX_JOBS:
        raise ProvidedJobsError(f"create_jobs() returned {len(items)} jobs; at most {MAX_JOBS}")
    names = [f"{parent.job_name}-{i + 1}" for i in range(len(items))]
    return [_spec(i, item, names, parent) for i, item in enumerate(items)]


def _spec(i: int, item: Any, names: list[str], parent: common_pb2.JobSpec) -> common_pb2.JobSpec:
    where = f"job {i + 1} of create_jobs()"
    if not isinstance(item, dict):
        raise ProvidedJobsError(f"{where} is not an object")
    spec = common_pb2.JobSpec(job_name=names[i], workflow=parent.workflow, provider=parent.provider)
    spec.image = _string(item.get("image"), f"{where}: image") or parent.image
    spec.commands.extend(_strings(item.get("commands"), f"{where}: commands", MAX_COMMANDS))
    env = item.get("environment") or {}
    if not isinstance(env, dict) or len(env) > MAX_ENV:
        raise ProvidedJobsError(f"{where}: environment must be a mapping of at most {MAX_ENV} names")
    for k, v in env.items():
        spec.env[_string(k, f"{where}: environment")] = _string(v if isinstance(v, str) else json.dumps(v), k)
    spec.working_dir = _string(item.get("working_dir"), f"{where}: working_dir")
    for path in _strings(item.get("artifacts"), f"{where}: artifacts", 100):
        spec.artifacts.add(path=path)
    spec.port_count = _count(item.get("port_count"), f"{where}: port_count", 100)
    for port in item.get("ports") or []:
        p = _count(port, f"{where}: ports", 65535)
        spec.ports.add(container_port=p, host_port=p)
    spec.resources.CopyFrom(_resources(item.get("resources"), where))
    deps = item.get("depends_on") or []
    if not isinstance(deps, list):
        raise ProvidedJobsError(f"{where}: depends_on must be a list")
    for d in deps:
        spec.depends_on.append(names[_index(d, len(names), i, f"{where}: depends_on")])
    master = item.get("master")
    if master is not None:
        spec.gang = names[_index(master, len(names), i, f"{where}: master")]  # the coordinator makes the gang
    return spec


def _resources(r: Any, where: str) -> common_pb2.Resources:
    out = common_pb2.Resources()
    if r is None:
        return out
    if not isinstance(r, dict):
        raise ProvidedJobsError(f"{where}: resources must be an object")
    out.cpu = _count(r.get("cpu"), f"{where}: resources.cpu", 4096)
    out.memory_bytes = _size(r.get("memory"), f"{where}: resources.memory")
    out.shm_size_bytes = _size(r.get("shm_size"), f"{where}: resources.shm_size")
    out.interruptible = bool(r.get("interruptible"))
    gpu = r.get("gpu")
    if gpu is not None:
        if not isinstance(gpu, dict):
            raise ProvidedJobsError(f"{where}: resources.gpu must be an object")
        out.gpu.count = _count(gpu.get("count"), f"{where}: resources.gpu.count", 1024)
        out.gpu.name = _string(gpu.get("name"), f"{where}: resources.gpu.name")
        out.gpu.memory_bytes = _size(gpu.get("memory"), f"{where}: resources.gpu.memory")
    return out


def _index(value: Any, n: int, own: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n or value == own:
        raise ProvidedJobsError(f"{where} must name another job of the list")
    return value


def _string(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_STRING or "\x00" in value:
        raise ProvidedJobsError(f"{where} must be a string (at most {MAX_STRING} characters)")
    return value


def _strings(value: Any, where: str, most: int) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > most:
        raise ProvidedJobsError(f"{where} must be a list of at most {most} strings")
    return [_string(v, where) for v in value]


def _count(value: Any, where: str, most: int) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
        raise ProvidedJobsError(f"{where} must be a whole number from 0 to {most}")
    return value


def _size(value: Any, where: str) -> int:
    """`64GB` (10^9), `1.5GiB` (2^30), or bytes: read as the CLI reads workflow sizes (cli/fields.py)."""
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63:
        return value
    m = _SIZE.fullmatch(value) if isinstance(value, str) and len(value) < 40 else None
    unit = m.group(2).upper() if m else ""
    letter = unit.replace("I", "").replace("B", "")
    if m is None or ("I" in unit and not letter):
        raise ProvidedJobsError(f"{where}: {str(value)[:40]!r} is not a size (e.g. 512MB, 64GB, 1.5GiB)")
    size = int(float(m.group(1)) * (1024 if "I" in unit else 1000) ** _POWERS[letter])
    if size >= 1 << 63:
        raise ProvidedJobsError(f"{where}: {value!r} is too large")
    return size
