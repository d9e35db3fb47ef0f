"""How attempts of a job are told apart on the agent protocol and in its logs.

A job can run several times (workflow `retry`, preemption): attempts 1..N. Agents know a job by the
id in its assignment, so each attempt gets its own: attempt 1 keeps the job's id (what agents and
databases before attempts saw), attempt N > 1 is `JOBID-aN`. An agent that comes back with an old
attempt, or reports on one, is then recognisably late: the coordinator tells it to abort and ignores
its updates, whatever the job does meanwhile.

Log lines are stored per attempt in one sequence per job: a line's stored seq is the attempt's
base ((attempt - 1) << 32) plus the agent's seq, so attempt 1 keeps plain seqs, one `StreamLogs`
cursor per job orders every attempt, and a line's attempt is its seq >> 32.
"""

from __future__ import annotations

import re

SEQ_BITS = 32
_WIRE = re.compile(r"^(?P<job>.+)-a(?P<attempt>[2-9]|[1-9]\d{1,5})$")


def wire_job_id(job_id: str, attempt: int) -> str:
    """The id an agent knows the attempt by."""
    return job_id if attempt <= 1 else f"{job_id}-a{attempt}"


def parse_wire_job_id(wire: str) -> tuple[str, int]:
    """(job id, attempt) of an id an agent sent."""
    if "-a" not in wire:  # attempt 1, nearly every report (a job's id has no "-a"): no regex, ~7 calls a job
        return wire, 1
    m = _WIRE.match(wire)
    if m is None:
        return wire, 1
    return m["job"], int(m["attempt"])


def stored_seq(attempt: int, seq: int) -> int:
    return ((attempt - 1) << SEQ_BITS) + seq


def attempt_base(attempt: int) -> int:
    """Stored seqs of the attempt are above this, and at most this + 2**32 - 1."""
    return (attempt - 1) << SEQ_BITS


def attempt_of_seq(seq: int) -> int:
    return (seq >> SEQ_BITS) + 1
