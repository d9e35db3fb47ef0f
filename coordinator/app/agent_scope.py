"""Least privilege for agents: the one check every agent call goes through.

An agent's credential proves who it is; this module decides what it may touch: the jobs assigned
to it that may still act (coordinator/store/scope.py says which statuses), the code those jobs run,
and the artifacts they take as inputs. Each check costs one indexed query.

- unary calls (code, grants, artifacts) are refused with Forbidden (PERMISSION_DENIED, which
  the agent does not retry), whatever the job, run or blob: a job that does not exist reads the
  same as another agent's, so a refusal tells a prober nothing;
- on the Connect stream (coordinator/app/agent_stream.py), log lines and status updates for other
  jobs are dropped with a warning naming the agent: never stored, so they cannot add to or take
  the place of another job's lines, nor keep lines of a job that does not exist. They are
  acknowledged all the same, so an honest agent that still holds lines of a job it lost (its lease
  ran out) stops resending them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from dstack.coordinator.app.core import Core
from dstack.coordinator.errors import Forbidden
from dstack.coordinator.store import JobLocation
from dstack.coordinator.store.db import Store

log = logging.getLogger("dstack.coordinator")


async def own_job(core: Core, agent_id: str, wire_id: str) -> JobLocation:
    """The job whose attempt the agent names, if that is the job's current attempt, assigned to the
    agent and still acting (a lost agent's late uploads for an attempt that is over are refused)."""
    job = await core.db(core.store.agent_acting_job, agent_id, wire_id)
    if job is None:
        log.warning("agent %s was refused job %s: not one of its running jobs", agent_id, wire_id)
        raise Forbidden(f"job {wire_id} is not running on this agent (or that attempt is over)")
    return job


async def check_code(core: Core, agent_id: str, code_hash: str) -> None:
    """The code blob is the code of one of the agent's jobs."""
    if not await core.db(core.store.agent_has_code, agent_id, code_hash):
        log.warning("agent %s was refused code %s: none of its running jobs runs it", agent_id, code_hash[:12])
        raise Forbidden(f"code {code_hash[:12]} is not the code of a job running on this agent")


async def check_inputs(core: Core, agent_id: str, sources: Sequence[tuple[str, str]]) -> None:
    """Each (run name, job name) is an input of one of the agent's jobs (a job it depends on, or
    one of a run it takes artifacts from)."""
    allowed = await core.db(core.store.agent_input_sources, agent_id)
    for run_name, job_name in sources:
        if (run_name, job_name) not in allowed:
            log.warning(
                "agent %s was refused the artifacts of %s/%s: not an input of its jobs", agent_id, run_name, job_name
            )
            raise Forbidden(f"the artifacts of {run_name}/{job_name} are not an input of a job running on this agent")


async def reportable(core: Core, agent_id: str, wire_ids: Sequence[str]) -> tuple[set[str], set[str]]:
    """Of the attempts an agent's stream message names, (current, ended): its acting attempts (lines
    and updates) and its own attempts that ended while their job goes on (lines only, into their
    own range). What it says about any other is dropped by coordinator/app/agent_stream.py."""
    return await core.db(core.store.agent_reportable, agent_id, wire_ids)


def reportable_now(store: Store, agent_id: str, wire_ids: Sequence[str]) -> tuple[set[str], set[str]]:
    """`reportable`, on the DB thread itself: for a call that checks and stores in one trip there
    (coordinator/app/agent_stream.py, a message of log lines alone)."""
    return store.agent_reportable(agent_id, wire_ids)


DROP_LOG_INTERVAL_S = 60.0
# (agent id, kind of message) -> (when its last warning was logged, drops since)
_drops: dict[tuple[str, str], tuple[float, int]] = {}


def dropped(agent_id: str, kind: str, what: str, job_id: str, now: float | None = None) -> None:
    """Logs a dropped message (`kind`: lines or update): the first of each kind from an agent at once,
    then at most one a minute that counts the rest, so a rogue agent cannot fill the coordinator's log."""
    now = time.monotonic() if now is None else now
    key = (agent_id, kind)
    last, since = _drops.get(key, (float("-inf"), 0))
    if now - last < DROP_LOG_INTERVAL_S:
        _drops[key] = (last, since + 1)
        return
    more = f" ({since} more dropped since the last warning)" if since else ""
    log.warning("agent %s sent %s for job %s, which is not running on it: dropped%s", agent_id, what, job_id, more)
    if len(_drops) > 10_000:
        _drops.clear()
    _drops[key] = (now, 0)
