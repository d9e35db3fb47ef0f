"""The run record (docs/reproducibility.md): what is kept of a run to say what ran, on what, with what.

Two parts arrive from outside and are bounded here before they are stored: the submission's resolved
workflow (from the CLI: any client may send anything) and each job's environment (from the agent that
ran it: the coordinator trusts no agent). Every string is cut to a length and stripped of control
characters, lists are cut to a count, numbers are clamped, and unknown keys are dropped; a part that
was cut says so (`truncated`), so a reader never mistakes a bounded record for a whole one.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dstack.coordinator.errors import InvalidRequest

if TYPE_CHECKING:
    from dstack.coordinator.app.runs import Submission

RECORD_VERSION = "dstack.run-record/v1"

MAX_RESOLVED_WORKFLOW = 256 * 1024  # bytes of JSON
MAX_UNTRACKED = 10_000  # file names in a code ref
MAX_PATH = 4096
MAX_FIELD = 512  # a name, a version, an image reference
MAX_PACKAGES = 256 * 1024  # `pip freeze` text
MAX_DIGESTS = 16
MAX_GPUS = 64
MAX_PHASE_NS = 10 * 365 * 24 * 3600 * 10**9  # ten years: anything longer is a lie
# setup: the runtime starting the job; environment: `requirements` made or reused, inside the job.
PHASES = ("pulling", "code", "inputs", "setup", "environment", "running", "uploading")

# Control characters but newline and tab: they would rewrite a terminal that prints the record.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def manifest_hash(files: Sequence[tuple[str, int, str]]) -> str:
    """sha256 of a job's artifact manifest: the sorted (path, size, sha256) of its files, as canonical JSON.
    Two jobs with the same files have the same hash, whatever their run."""
    canonical = json.dumps(sorted([p, s, h] for p, s, h in files), separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def clean(text: str, limit: int, keep_newlines: bool = False) -> tuple[str, bool]:
    """The text without control characters (newlines kept if asked), cut to `limit` characters;
    and whether it was changed by the cut."""
    cleaned = _CONTROL.sub("", text[: limit * 4 + 1])  # a hostile megabyte is not scanned whole
    if not keep_newlines:
        cleaned = cleaned.replace("\n", " ").replace("\t", " ")
    return cleaned[:limit], len(cleaned) > limit or len(text) > limit * 4 + 1


def submission_record(sub: Submission) -> dict[str, Any]:
    """The run's part written at submission: the resolved workflows as the client sent them."""
    resolved: Any = {}
    if sub.resolved_workflow:
        if len(sub.resolved_workflow.encode()) > MAX_RESOLVED_WORKFLOW:
            raise InvalidRequest(
                f"the resolved workflow is {len(sub.resolved_workflow.encode())} bytes of JSON;"
                f" at most {MAX_RESOLVED_WORKFLOW} are kept in a run's record"
            )
        try:
            resolved = json.loads(sub.resolved_workflow)
        except ValueError as e:
            raise InvalidRequest(f"the resolved workflow is not JSON: {e}") from None
        if not isinstance(resolved, dict):
            raise InvalidRequest("the resolved workflow must be a JSON object")
    if len(sub.code.untracked) > MAX_UNTRACKED or any(len(n) > MAX_PATH for n in sub.code.untracked):
        raise InvalidRequest(f"a code reference lists at most {MAX_UNTRACKED} untracked files of {MAX_PATH} characters")
    return {"resolved_workflow": resolved, "args": list(sub.args)}


def _int(value: Any, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return 0
    return max(low, min(high, number))


def environment_record(
    *,
    runtime: str,
    image: str,
    image_id: str,
    image_digests: Iterable[str],
    python_version: str,
    os: str,
    packages: str,
    packages_truncated: bool,
    phase_ns: Mapping[str, int],
    agent_version: str,
    gpus: Iterable[Mapping[str, Any]],
    driver_version: str,
    cuda_version: str,
) -> dict[str, Any]:
    """A job's environment as an agent reported it, bounded and sanitised (see the module's note)."""
    cut = False

    def field(text: str, limit: int = MAX_FIELD) -> str:
        nonlocal cut
        value, was_cut = clean(text, limit)
        cut |= was_cut
        return value

    digests = list(image_digests)
    cut |= len(digests) > MAX_DIGESTS
    pkg_text, pkg_cut = clean(packages, MAX_PACKAGES, keep_newlines=True)
    gpu_list = list(gpus)
    cut |= len(gpu_list) > MAX_GPUS
    unknown_phases = set(phase_ns) - set(PHASES)
    cut |= bool(unknown_phases)
    return {
        "runtime": field(runtime, 16),
        "image": field(image),
        "image_id": field(image_id, 128),
        "image_digests": [field(d) for d in digests[:MAX_DIGESTS]],
        "python_version": field(python_version, 64),
        "os": field(os),
        "packages": pkg_text,
        "packages_truncated": bool(packages_truncated) or pkg_cut,
        "phase_ns": {p: _int(phase_ns[p], 0, MAX_PHASE_NS) for p in PHASES if p in phase_ns},
        "agent_version": field(agent_version, 64),
        "gpus": [
            {
                "index": _int(g.get("index"), 0, 1 << 16),
                "name": field(str(g.get("name", ""))),
                "uuid": field(str(g.get("uuid", "")), 128),
                "memory_total_bytes": _int(g.get("memory_total_bytes"), 0, 1 << 50),
                "simulated": bool(g.get("simulated")),
            }
            for g in gpu_list[:MAX_GPUS]
        ],
        "driver_version": field(driver_version, 64),
        "cuda_version": field(cuda_version, 64),
        "truncated": cut,
    }
