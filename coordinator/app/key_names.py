"""Names a client or agent chooses that become one segment of a storage key or a path.

A job's name is the `JOB` of runs/RUN/JOB/... in the object store (logs, artifacts, manifests): a
name such as `..`, `a/b` or one with a control character would make a key the store refuses (or one
outside the job's folder), and the log archiver would stop at it for every run. Checked when the
name enters (SubmitRun), with a message that says what is allowed.
"""

from __future__ import annotations

from dstack.coordinator.errors import InvalidRequest

MAX_SEGMENT = 200


def check_key_segment(what: str, value: str) -> str:
    """`value` as one path segment: non-empty, not `.` or `..`, no slash, backslash or control character."""
    bad = (
        not value
        or len(value) > MAX_SEGMENT
        or value in (".", "..")
        or "/" in value
        or "\\" in value
        or any(ord(c) < 32 or ord(c) == 127 for c in value)
    )
    if bad:
        raise InvalidRequest(
            f"invalid {what} {value[:80]!r}: 1 to {MAX_SEGMENT} characters, not '.' or '..',"
            " with no '/', '\\' or control characters"
        )
    return value
