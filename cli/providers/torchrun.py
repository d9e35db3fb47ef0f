"""The `torchrun` provider: a Python script under torchrun, one node per agent (docs/multinode.md).

As the python provider (file, args, version, requirements, environment), but the script runs as

    torchrun --nnodes $NNODES --node_rank $NODE_RANK --nproc_per_node N \\
             --master_addr $MASTER_ADDR --master_port $MASTER_PORT FILE ARGS

with N the GPUs dstack gave this node (CUDA_VISIBLE_DEVICES), or 1 on a node without GPUs. With
`resources.nodes: K` the coordinator runs K such jobs, one per agent, and sets NNODES, NODE_RANK,
MASTER_ADDR and MASTER_PORT; a one-node job (no MASTER_ADDR) runs `torchrun --standalone`, which
picks its own free port. With `requirements`, the agent's environment helper runs the venv's
`python -m torch.distributed.run` (what the `torchrun` script itself runs).
"""

from __future__ import annotations

from dstack.cli import fields
from dstack.cli.errors import ProviderError
from dstack.cli.providers.python import PythonProvider
from dstack.cli.spec import Workflow
from dstack.protos.v1 import common_pb2

MAX_NODES = 64

# Processes per node: one per GPU of this node (the agent sets CUDA_VISIBLE_DEVICES to them, "" for
# none), at least one. `|| true`: grep -c exits 1 when it counts none, which `bash -e` would stop at.
NPROC = (
    "DSTACK_NPROC_PER_NODE=$(printf '%s' \"${CUDA_VISIBLE_DEVICES:-}\" | tr ',' '\\n' | grep -c . || true);"
    ' [ "$DSTACK_NPROC_PER_NODE" -gt 0 ] || DSTACK_NPROC_PER_NODE=1'
)
# The rendezvous: a gang member's (coordinator/gangs.py), else a single node on its own.
RENDEZVOUS = (
    'if [ -n "${MASTER_ADDR:-}" ]; then DSTACK_TORCHRUN_ARGS="--nnodes $NNODES --node_rank $NODE_RANK'
    ' --master_addr $MASTER_ADDR --master_port $MASTER_PORT";'
    ' else DSTACK_TORCHRUN_ARGS="--standalone --nnodes 1"; fi'
)
ARGS = '$DSTACK_TORCHRUN_ARGS --nproc_per_node "$DSTACK_NPROC_PER_NODE"'


class TorchrunProvider(PythonProvider):
    """Runs `file` with `args` under torchrun on every node of the job (see the module's docstring)."""

    name = "torchrun"
    schema = {
        **PythonProvider.schema,
        # 2022's torchrun docs put `nodes` at the top of the workflow; `resources.nodes` works too.
        "nodes": {"type": "integer", "minimum": 1, "maximum": MAX_NODES, "description": "how many nodes (agents)"},
    }

    def _nodes(self, wf: Workflow) -> int:
        """The top-level `nodes` (0: not given)."""
        if "nodes" not in wf.node:
            return 0
        if wf.resources.nodes:
            raise ProviderError("'nodes' and 'resources.nodes' both give the nodes: keep one", wf.node.at("nodes"))
        return fields.whole_number(wf.node, "nodes", 1, MAX_NODES)

    def validate(self, wf: Workflow) -> None:
        self._nodes(wf)
        super().validate(wf)

    def job_specs(self, wf: Workflow) -> list[common_pb2.JobSpec]:
        specs = super().job_specs(wf)
        nodes = self._nodes(wf)
        if nodes:
            for spec in specs:
                spec.resources.nodes = nodes
        return specs

    def commands(self, wf: Workflow) -> list[str]:
        return [NPROC, RENDEZVOUS, *super().commands(wf)]

    def python_argv(self, run: str) -> str:
        return f"-m torch.distributed.run {ARGS} {run}"

    def launch(self, python: str, run: str) -> str:
        # `torchrun` of the PATH the commands before set up (the job's venv first, when it has one).
        return f"exec torchrun {ARGS} {run}"
