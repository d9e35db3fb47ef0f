"""Stored blobs read for a view, parsed or, where the row is damaged, a placeholder that says so.

A job's spec, a run's code reference and an agent's inventory are kept as serialized dstack.v1 messages
(coordinator/convert.py). A damaged database (a bad disk, a write behind the coordinator's back) can hold
one that no longer parses. A view (GetRun, ListRuns, ListAgents, the HTTP API and so `dstack ps`, `show`,
`agents` and the web page) must still answer: the damaged row shows with its status and a marker in its
message, the others as they are. One helper per kind of blob, so that no view sprinkles its own try.

Each damaged row is logged once (not at every call that meets it: a `ps` loop would flood the log), up to
`WARNED_ROWS` rows; past that the set starts again (a database that damaged is one to restore anyway).
The normal path costs nothing more: a `try` that does not raise is free in Python 3.11.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from google.protobuf.message import DecodeError

from dstack.coordinator import convert  # a module: convert reads this one's helpers too
from dstack.coordinator.model import CodeRef, Inventory
from dstack.protos.v1 import client_pb2, common_pb2

log = logging.getLogger(__name__)

DAMAGED = "the database is damaged"
SPEC_DAMAGED = f"its stored spec could not be read ({DAMAGED})"
CODE_DAMAGED = f"its stored code reference could not be read ({DAMAGED})"
INVENTORY_DAMAGED = f"? (its stored inventory could not be read: {DAMAGED})"  # shown as the agent's hostname

WARNED_ROWS = 4096
_warned: set[tuple[str, str]] = set()


def _damaged(kind: str, key: str, e: Exception) -> None:
    """Logs a damaged row once."""
    if (kind, key) in _warned:
        return
    if len(_warned) >= WARNED_ROWS:
        _warned.clear()
    _warned.add((kind, key))
    log.warning(
        "the stored %s of %s could not be read (%s): %s; it shows as damaged. Restore the database from a"
        " backup, or remove the row (`dstack delete` for a run, `dstack agents remove` for an agent)",
        kind,
        key,
        type(e).__name__,
        e,
    )


def with_marker(message: str, marker: str) -> str:
    """The row's own message, after the marker that says what of it could not be read."""
    return f"{marker}; {message}" if message else marker


def merge_spec(into: common_pb2.JobSpec, job_id: str, data: bytes) -> bool:
    """Parses job `job_id`'s stored spec into `into` (a field of a message being built: no copy); False, with
    `into` left empty, where it is damaged."""
    try:
        into.MergeFromString(data)
        return True
    except DecodeError as e:
        into.Clear()
        _damaged("spec", f"job {job_id}", e)
        return False


def job_spec(job_id: str, data: bytes) -> common_pb2.JobSpec | None:
    """Job `job_id`'s stored spec; None where it is damaged."""
    spec = common_pb2.JobSpec()
    return spec if merge_spec(spec, job_id, data) else None


def code(run_id: str, data: bytes) -> CodeRef | None:
    """Run `run_id`'s stored code reference; None where it is damaged."""
    try:
        return convert.code_from_bytes(data)
    except DecodeError as e:
        _damaged("code reference", f"run {run_id}", e)
        return None


def record_part(run_id: str, job_id: str, part: str, text: str) -> dict[str, Any] | None:
    """A part of a run's record (coordinator/store/records.py), a JSON object; None where it is damaged."""
    try:
        body = json.loads(text)
        if isinstance(body, dict):
            return body
        e: Exception = ValueError(f"a JSON {type(body).__name__}, not an object")
    except (ValueError, TypeError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        e = error
    _damaged(f"record part {part!r}", f"run {run_id} (job {job_id or '-'})", e)
    return None


def log_chunk(job_id: str, first_seq: int, last_seq: int, body: bytes) -> bytes:
    """A stored chunk of job `job_id`'s lines (a serialized dstack.v1.JobLogs), as it is where it parses; where
    it is damaged, one system line at `last_seq` that says which lines are lost, so that a reader's cursor
    moves past them and the lines after them still come."""
    try:
        client_pb2.JobLogs.FromString(body)  # C parse, no object per line in a chunk of blocks: ~1 µs
        return body
    except DecodeError as e:
        _damaged(f"log lines {first_seq}-{last_seq}", f"job {job_id}", e)
    line = common_pb2.LogLine(
        seq=last_seq,
        stream=common_pb2.LOG_STREAM_SYSTEM,
        text=f"[lines {first_seq}-{last_seq} could not be read: {DAMAGED}]",
    )
    return client_pb2.JobLogs(lines=[line]).SerializeToString()


def inventory(agent_id: str, data: bytes | None) -> Inventory:
    """Agent `agent_id`'s stored inventory; where it is damaged, an empty one whose hostname says so."""
    try:
        return convert.inventory_from_bytes(data)
    except DecodeError as e:
        _damaged("inventory", f"agent {agent_id}", e)
        return Inventory(hostname=INVENTORY_DAMAGED)
