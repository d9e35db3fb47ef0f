"""The lease a coordinator's start owes every online agent, kept in the state folder across restarts.

Why it is kept (docs/lifecycle.md, "Self-fencing"). A coordinator's hello ack tells an agent that a refused
connection to its port at instant `t` lets the agent keep its jobs until `t + self_fence_after +
reconnect_grace` (agent/lease.py). That is a promise made for whatever coordinator runs next on this state:
nobody may requeue the agent's jobs before then. The promise holds because

1. a refusal at `t` means no coordinator was listening at `t`. A coordinator stops its lease loop before it
   stops listening, and starts it only after it listens (coordinator/server.py), so no lease loop ran at
   `t`, and the next one to run belongs to a coordinator that starts at some `s > t`;
2. that start gives every online agent a lease until at least `s + W`, where `W` is the largest
   `lease + fence margin + reconnect grace` that any coordinator on this state ever published, this one
   included (this file keeps it, written before a hello ack can carry a larger one: `honour`); an agent's
   later hello or messages only lengthen that lease (coordinator/leases.py `grant` keeps the later end);
3. the published promise is `self_fence_after + reconnect_grace = lease + margin - kill time + grace <= W -
   kill time`, so the agent stops its jobs at least the kill time before `s + W`: as for any lease, no
   attempt runs on two agents at once, even if the new coordinator answers the agent's hello late, or the
   agent never comes back.

Without the file, a coordinator restarted with a smaller `--reconnect-grace` or `--lease-timeout` would
requeue before what its predecessor promised. The kept figure only grows: lowering those options shortens
every lease but the one a start gives, which stays the largest ever published (delete the file, with the
coordinator stopped, to forget it once no agent runs a job it was promised to).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("dstack.coordinator")

FILE = "restart-lease.json"


def kept(state_dir: Path) -> float:
    """The largest restart lease (seconds) published on this state; 0 if none was kept (a new state)."""
    path = state_dir / FILE
    try:
        data = json.loads(path.read_text())
        return max(0.0, float(data["seconds"]))
    except FileNotFoundError:
        return 0.0
    except (OSError, ValueError, KeyError, TypeError) as e:
        # Written atomically, so only a hand edit or a damaged disk gets here: what was promised is unknown.
        log.warning("%s is unreadable (%s): restart leases count from this coordinator's options alone", path, e)
        return 0.0


def honour(state_dir: Path, own_s: float) -> float:
    """(Blocking: call on a thread.) The restart lease kept for every later start, `max(own, kept)`: keeps
    `own` first if it is larger, durably (written, synced, renamed, the folder synced), so that a hello ack
    that publishes it is never answered by a later start that forgot it. Raises OSError if it cannot (a full
    disk): then only what was kept before may be promised (Engine.keep_restart_lease)."""
    before = kept(state_dir)
    if own_s <= before:
        return before
    path = state_dir / FILE
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump({"seconds": own_s}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return own_s
