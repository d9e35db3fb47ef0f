"""Readers for typed workflow fields: each error names the file, line and field."""

from __future__ import annotations

import difflib
import math
import posixpath
import re
from typing import Any

from dstack.cli.errors import WorkflowError
from dstack.cli.yamlsrc import Node, Seq

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?i?B?)\s*$", re.IGNORECASE)
MAX_SIZE = 1 << 63
# A Docker image reference: [DOMAIN[:PORT]/]PATH[:TAG][@DIGEST] (github.com/distribution/reference).
_DOMAIN = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::\d+)?"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(
    rf"^(?:{_DOMAIN}/)?{_PATH}(?:/{_PATH})*(?::[\w][\w.-]{{0,127}})?(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{{32,}})?$"
)
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}


def check_unknown(node: Node, known: set[str], what: str) -> None:
    for key in node:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(sorted(known))}"
            raise WorkflowError(f"unknown field {key!r} in {what}{hint}", node.key_locations[key])


def string(node: Node, key: str, required: bool = False, default: str = "") -> str:
    if key not in node or node[key] is None:
        if required:
            raise WorkflowError(f"missing required field {key!r}", node.location)
        return default
    value = node[key]
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise WorkflowError(f"field {key!r} must be a string, not {type_name(value)}", node.at(key))
    if isinstance(value, str):
        return value
    return node.raw_values.get(key, str(value))  # as written: `3.10` stays "3.10", not "3.1"


def scalar_text(node: Node, key: str) -> str:
    """A scalar mapping value as the user wrote it (YAML 1.1 would turn `yes` into True, `0123` into 83)."""
    value = node[key]
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return node.raw_values.get(key, str(value))


def string_list(node: Node, key: str, required: bool = False, split: bool = False) -> list[str]:
    """A list of strings; with split, a single string is accepted as one item."""
    if key not in node or node[key] is None:
        if required:
            raise WorkflowError(f"missing required field {key!r}", node.location)
        return []
    value = node[key]
    if isinstance(value, str) and split:
        return [value]
    if not isinstance(value, list):
        raise WorkflowError(f"field {key!r} must be a list of strings, not {type_name(value)}", node.at(key))
    out = []
    for i, item in enumerate(value):
        if isinstance(item, (dict, list)) or item is None:
            loc = value.item_locations[i] if isinstance(value, Seq) else node.at(key)
            raise WorkflowError(f"item {i + 1} of {key!r} must be a string, not {type_name(item)}", loc)
        raw = value.item_raw[i] if isinstance(value, Seq) else None
        out.append(raw if raw is not None and not isinstance(item, str) else str(item))  # `- true` is "true"
    return out


def type_name(value: Any) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def size_bytes(node: Node, key: str) -> int:
    """`64GB` (decimal, 64 * 10^9), `1.5GiB` or `1.5Gi` (binary, 1.5 * 2^30), or a plain number of bytes."""
    value = node.get(key)
    if value is None:
        return 0
    if isinstance(value, bool):
        raise WorkflowError(f"field {key!r} must be a size like 64GB, not a boolean", node.at(key))
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or not 0 <= value < MAX_SIZE:
            raise WorkflowError(f"field {key!r} must be a size from 0 to 8 EiB, got {value}", node.at(key))
        return int(value)
    m = _SIZE.match(str(value))
    if not m:
        raise WorkflowError(f"field {key!r}: {value!r} is not a size (e.g. 512MB, 64GB, 1.5GiB)", node.at(key))
    number, unit = float(m.group(1)), m.group(2).upper()
    letter = unit.replace("I", "").replace("B", "")
    if "I" in unit and not letter:
        raise WorkflowError(f"field {key!r}: {value!r} is not a size", node.at(key))
    # As 2022 dstack read them (its `_str_to_mib`) and as Kubernetes reads G and Gi: K/M/G/T/P with or
    # without B are powers of 1000 (64GB = 64 * 10^9 bytes), KiB/MiB/GiB/... and Ki/Mi/Gi/... powers of 1024.
    base = 1024 if "I" in unit else 1000
    result = int(number * base ** _POWERS[letter])
    if result >= MAX_SIZE:
        raise WorkflowError(f"field {key!r}: {value!r} is too large", node.at(key))
    return result


def number(node: Node, key: str, minimum: float = 0, maximum: float = 1e6) -> float:
    value = node.get(key)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WorkflowError(f"field {key!r} must be a number, not {type_name(value)}", node.at(key))
    if not math.isfinite(value) or not minimum <= value <= maximum:
        raise WorkflowError(f"field {key!r} must be between {minimum:g} and {maximum:g}, got {value}", node.at(key))
    return float(value)


def whole_number(node: Node, key: str, minimum: int, maximum: int) -> int:
    value = node.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise WorkflowError(f"{key!r} must be a whole number from {minimum} to {maximum}, got {value!r}", node.at(key))
    return value


def relative_path(node: Node, key: str, value: str) -> str:
    norm = posixpath.normpath(value)
    if not value or value.startswith("/") or norm == ".." or norm.startswith("../"):
        raise WorkflowError(
            f"{key} path {value!r} must be relative and stay inside the working directory", node.at(key)
        )
    return norm


def image_ref(node: Node, key: str) -> str:
    """A container image reference, e.g. python:3.11-slim, ghcr.io/org/app:1.0, or empty."""
    value = string(node, key)
    if value and not _IMAGE.match(value):
        hint = "; repository names are lowercase" if value.lower() != value and _IMAGE.match(value.lower()) else ""
        raise WorkflowError(
            f"{key} {value!r} is not an image reference like python:3.11-slim or ghcr.io/org/app:1.0{hint}",
            node.at(key),
        )
    return value


_DURATION = re.compile(r"^\s*(?:(\d+)d)?\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s)?\s*$")
MAX_DURATION_S = 366 * 86400


def duration_s(node: Node, key: str) -> int:
    """`2h`, `30m`, `90s`, `1h30m`, `1d`, or a plain number of seconds; 0 when absent."""
    value = node.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise WorkflowError(
            f"field {key!r} must be a duration like 2h, 30m or 90s, not {type_name(value)}", node.at(key)
        )
    if isinstance(value, (int, float)):
        seconds = value
    else:
        m = _DURATION.match(str(value))
        if m is None or not any(m.groups()):
            raise WorkflowError(f"field {key!r}: {value!r} is not a duration (e.g. 2h, 30m, 90s, 1h30m)", node.at(key))
        d, h, mi, s = (int(g or 0) for g in m.groups())
        seconds = ((d * 24 + h) * 60 + mi) * 60 + s
    if not isinstance(seconds, int) or not 1 <= seconds <= MAX_DURATION_S:
        raise WorkflowError(f"field {key!r} must be from 1 second to 366 days, got {value!r}", node.at(key))
    return seconds
