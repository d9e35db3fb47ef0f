#!/usr/bin/env bash
# The checks that need a real NVIDIA GPU (no GPU exists on the dev/CI machines):
#   1. the agent's NVML inventory (agent.inventory, through pynvml);
#   2. a real coordinator + agent + CLI run of a 1-GPU job, pinned with CUDA_VISIBLE_DEVICES,
#      printing `nvidia-smi -L` and what CUDA (PyTorch, if present) sees;
#   3. a request the pool can never satisfy (more GPUs than the host has) and its reason;
#   4. when a Docker engine with the NVIDIA container toolkit answers: the same 1-GPU job through an
#      agent with --runtime docker (device request by UUID), printing `nvidia-smi -L` in the container.
# Usage: scripts/gpu-check.sh [LOGFILE]   (extra wheels, if any, in .whl/)
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:-/dev/null}
exec > >(tee "$log") 2>&1

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 DSTACK_LOG_LEVEL=WARNING
echo "== host"; nvidia-smi -L; python3 --version

echo "== 1. NVML inventory through the agent's code"
python3 - <<'EOF'
from pathlib import Path
from google.protobuf.json_format import MessageToDict
from agent.inventory import Inventory
inv = Inventory(Path("/tmp/dstack-agent-home"), "host", 64).collect()
d = MessageToDict(inv)
print({k: d[k] for k in ("hostname", "cpuCount", "memoryTotalBytes")})
for g in d.get("gpus", []):
    print("gpu", g)
assert inv.gpus, "NVML reported no GPU"
EOF

echo "== 2. a 1-GPU job through coordinator, agent and CLI"
tmp=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
DSTACK_ADMIN_TOKEN=adm DSTACK_JOIN_TOKEN=join python3 -m dstack.coordinator --state-dir "$tmp/server" \
  --listen "127.0.0.1:$port" >"$tmp/coordinator.log" 2>&1 &
cpid=$!
sleep 2
python3 -m dstack.agent --coordinator "127.0.0.1:$port" --join-token join --home "$tmp/agent" --name gpu-host \
  >"$tmp/agent.log" 2>&1 &
apid=$!
export DSTACK_HOME=$tmp/cli DSTACK_COORDINATOR=127.0.0.1:$port DSTACK_TOKEN=adm
mkdir -p "$tmp/p/.dstack"
model=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print $2}')  # e.g. H100
sed "s/GPU_MODEL/${model:-any}/" >"$tmp/p/.dstack/workflows.yaml" <<'EOF'
workflows:
  - name: gpu
    provider: bash
    commands:
      - nvidia-smi -L
      - echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"
      - python3 check_cuda.py
    resources:
      gpu:
        count: 1
        name: GPU_MODEL
  - name: too-many
    provider: bash
    commands: ["nvidia-smi -L"]
    resources:
      gpu: 2
EOF
cat >"$tmp/p/check_cuda.py" <<'EOF'
try:
    import torch
except ImportError:
    print("no torch on this host")
else:
    print("torch sees", torch.cuda.device_count(), "GPU:", torch.cuda.get_device_name(0))
    x = torch.randn(2048, 2048, device="cuda")
    print("matmul on the GPU ok:", float((x @ x).abs().sum()) > 0)
EOF
cd "$tmp/p"
for _ in $(seq 1 50); do python3 -m dstack.cli agents --json 2>/dev/null | grep -q '"online"' && break; sleep 0.2; done
python3 -m dstack.cli agents
python3 -m dstack.cli agents --json
timeout "${RUN_TIMEOUT:-180}" python3 -m dstack.cli run gpu
echo "exit code: $?"

echo "== 3. more GPUs than any agent has"
run=$(python3 -m dstack.cli run -d too-many)
sleep 2
python3 -m dstack.cli ps
python3 -m dstack.cli ps --json | python3 -c "import json,sys; r=[x for x in json.load(sys.stdin) if x['name']=='$run'][0]; print(r['status'], '|', r['message'])"
python3 -m dstack.cli stop "$run"

kill "$apid"; wait "$apid"
echo "== agent log"; tail -5 "$tmp/agent.log"

echo "== 4. a 1-GPU job in a container (--runtime docker)"
if docker info 2>/dev/null | grep -qi nvidia; then
  python3 -m dstack.agent --coordinator "127.0.0.1:$port" --join-token join --home "$tmp/agent-docker" --name gpu-docker \
    --runtime docker --docker-image-cuda "${CUDA_IMAGE:-nvidia/cuda:12.4.1-base-ubuntu22.04}" \
    >"$tmp/agent-docker.log" 2>&1 &
  dpid=$!
  for _ in $(seq 1 50); do python3 -m dstack.cli agents --json 2>/dev/null | grep -q '"docker"' && break; sleep 0.2; done
  cat >"$tmp/p/.dstack/workflows.yaml" <<'EOF2'
workflows:
  - name: gpu-container
    provider: bash
    commands:
      - test -f /.dockerenv && echo "in a container"
      - nvidia-smi -L
      - echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES NVIDIA_VISIBLE_DEVICES=$NVIDIA_VISIBLE_DEVICES"
    resources:
      gpu: 1
EOF2
  timeout "${RUN_TIMEOUT:-600}" python3 -m dstack.cli run gpu-container
  echo "exit code: $?"
  kill "$dpid"; wait "$dpid"
  tail -5 "$tmp/agent-docker.log"
else
  echo "skipped: no Docker engine with the NVIDIA runtime here"
fi
kill "$cpid"; wait "$cpid"
