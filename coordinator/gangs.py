"""Multi-node jobs: a workflow with `resources.nodes: N` becomes a gang of N jobs, one per agent.

The coordinator expands the submitted spec into its members here (`expand`), the planner places a
gang's members all at once on distinct agents or not at all (coordinator/planner.py), and each member
is handed the rendezvous it needs (`member_env`): rank 0's agent's advertised address and a port
there, its rank and the gang's size. What happens when a member fails is the store's gang sweep
(coordinator/store/gangs.py). docs/multinode.md is the user's side of it.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Collection, Sequence

from dstack.coordinator.errors import InvalidRequest
from dstack.coordinator.model import JobSpec
from dstack.protos.v1 import common_pb2

MAX_NODES = 64
# MASTER_PORT is picked in this range on rank 0's agent (torchrun's default, 29500, is its start).
PORT_FIRST, PORT_LAST = 29500, 29999


def member_name(gang: str, rank: int) -> str:
    """The job name of a gang's member: `train-node0`, `train-node1`, ..."""
    return f"{gang}-node{rank}"


def expand(jobs: Sequence[JobSpec]) -> list[JobSpec]:
    """The run's jobs with every multi-node job replaced by its members (rank order); a job that
    depends on a multi-node job depends on all its members."""
    members: dict[str, list[str]] = {}
    jobs = [_without_gang(j) for j in jobs]  # only the coordinator makes gangs: a client's own fields go
    for j in jobs:
        if j.resources.nodes > MAX_NODES:
            raise InvalidRequest(f"job {j.job_name!r}: resources.nodes is {j.resources.nodes}; at most {MAX_NODES}")
        if j.resources.nodes > 1:
            members[j.job_name] = [member_name(j.job_name, k) for k in range(j.resources.nodes)]
    if not members:
        return list(jobs)
    out: list[JobSpec] = []
    for j in jobs:
        depends_on = [m for d in j.depends_on for m in members.get(d, [d])]
        n = j.resources.nodes if j.job_name in members else 1
        for rank in range(n):
            proto = common_pb2.JobSpec.FromString(j.encoded)
            proto.depends_on[:] = depends_on
            if n > 1:
                proto.job_name = member_name(j.job_name, rank)
                proto.gang, proto.node_rank, proto.nnodes = j.job_name, rank, n
                if rank > 0:  # artifacts are saved on the master node (rank 0), as 2022's torchrun did
                    del proto.artifacts[:]
            out.append(
                dataclasses.replace(
                    j,
                    encoded=proto.SerializeToString(),
                    job_name=proto.job_name,
                    depends_on=tuple(depends_on),
                    gang=proto.gang,
                    node_rank=proto.node_rank,
                    nnodes=max(1, proto.nnodes),
                )
            )
    return out


def _without_gang(j: JobSpec) -> JobSpec:
    """The spec with no gang fields of the client's: a hand-made `gang`/`node_rank`/`nnodes` would
    make the coordinator treat a lone job as part of a gang it never built."""
    if not (j.gang or j.node_rank or j.nnodes > 1):
        return j
    proto = common_pb2.JobSpec.FromString(j.encoded)
    proto.ClearField("gang")
    proto.ClearField("node_rank")
    proto.ClearField("nnodes")
    return dataclasses.replace(j, encoded=proto.SerializeToString(), gang="", node_rank=0, nnodes=1)


def pick_port(used: Collection[int], rng: random.Random | None = None) -> int:
    """A MASTER_PORT for a gang whose rank 0 goes to an agent where the gangs it already runs hold
    `used`: one of the range's free ports, at random, so that a port another program took on that
    host (the coordinator cannot see those) is unlikely to be picked twice in a row when the gang is
    retried. Raises RuntimeError when the whole range is taken (500 gangs' masters on one agent)."""
    free = [p for p in range(PORT_FIRST, PORT_LAST + 1) if p not in used]
    if not free:
        raise RuntimeError(f"no free MASTER_PORT in {PORT_FIRST}-{PORT_LAST} on the agent")
    return (rng or random).choice(free)


def member_env(master: str, node_rank: int, nnodes: int) -> dict[str, str]:
    """What a member's job environment gets. WORLD_SIZE follows torchrun's convention of counting
    processes: dstack starts one process per node, so it is the number of nodes; a `torchrun`
    started there sets its workers' WORLD_SIZE to nodes x processes per node itself."""
    addr, _, port = master.rpartition(":")
    return {
        "MASTER_ADDR": addr,
        "MASTER_PORT": port,
        # 2022's names for the same place (a provider program's `master` job: its workers started
        # `torchrun --master_addr $MASTER_JOB_HOSTNAME --master_port $MASTER_JOB_PORT_0`).
        "MASTER_JOB_HOSTNAME": addr,
        "MASTER_JOB_PORT_0": port,
        "NODE_RANK": str(node_rank),
        "NNODES": str(nnodes),
        "WORLD_SIZE": str(nnodes),
        "DSTACK_NODE_RANK": str(node_rank),
        "DSTACK_NODES": str(nnodes),
    }
