#!/usr/bin/env bash
# The checks that need a real NVIDIA GPU (no GPU exists on the dev/CI machines), run on a lent GPU
# machine with one prepared call:
#   1. the agent's NVML inventory (agent.inventory, through nvidia-ml-py);
#   2. a real coordinator (TLS, as by default) + agent + CLI run of a 1-GPU job, pinned with
#      CUDA_VISIBLE_DEVICES, printing `nvidia-smi -L` and a CUDA matmul through PyTorch;
#   3. a request the pool can never satisfy (more GPUs than the host has) and its reason;
#   4. /metrics over HTTPS: the real GPU's utilisation and memory as the agent reported them;
#   5. a 2-node `torchrun` gang on two agents of this host (both see its GPU), whose processes
#      all-reduce a CUDA tensor with torch.distributed (gloo: NCCL refuses two ranks on one GPU),
#      and `dstack logs --node`;
#   6. when a Docker engine with the NVIDIA container toolkit answers: a 1-GPU job in a container.
# Usage: scripts/gpu-check.sh [LOGFILE]   (wheels the machine lacks, if any, in .whl/)
# A dry run of the plumbing on a machine without a GPU: SIMULATE=1 scripts/gpu-check.sh (agents report a
# simulated GPU; the CUDA parts fail).
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
# torchrun lives next to the python3 that holds PyTorch.
export PATH="$(dirname "$(command -v python3)"):$PATH"
export PYTHONUNBUFFERED=1 DSTACK_LOG_LEVEL=WARNING
echo "== host"; nvidia-smi -L; python3 --version; date -u; command -v torchrun || echo "no torchrun"

echo "== 1. NVML inventory through the agent's code"
python3 - <<'EOF'
from pathlib import Path
from google.protobuf.json_format import MessageToDict
from dstack.agent.inventory import Inventory
inv = Inventory(Path("/tmp/dstack-agent-home"), "host", 64).collect()
d = MessageToDict(inv)
print({k: d.get(k) for k in ("hostname", "cpuCount", "memoryTotalBytes")})
for g in d.get("gpus", []):
    print("gpu", g)
assert inv.gpus and not any(g.simulated for g in inv.gpus), "NVML reported no real GPU"
EOF
sim=()
[ -n "${SIMULATE:-}" ] && sim=(--simulate-gpus 1xH200)

echo "== 2. a 1-GPU job through coordinator, agent and CLI (TLS)"
tmp=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
DSTACK_ADMIN_TOKEN=adm DSTACK_JOIN_TOKEN=join python3 -m dstack.coordinator --state-dir "$tmp/server" \
  --listen "127.0.0.1:$port" --http-port 0 >"$tmp/coordinator.log" 2>&1 &
cpid=$!
for _ in $(seq 1 100); do [ -f "$tmp/server/tls/ca.pem" ] && [ -f "$tmp/server/http-url" ] && break; sleep 0.2; done
ca=$tmp/server/tls/ca.pem
agent() {  # NAME [extra options]: an agent of this host, jobs as this user
  local name=$1; shift
  DSTACK_JOIN_TOKEN=join python3 -m dstack.agent --coordinator "127.0.0.1:$port" --ca-file "$ca" \
    --home "$tmp/$name" --name "$name" --job-user none --advertise-address 127.0.0.1 "${sim[@]}" "$@" >"$tmp/$name.log" 2>&1 &
}
agent gpu-host --runtime host
apid=$!
export DSTACK_HOME=$tmp/cli DSTACK_COORDINATOR=127.0.0.1:$port DSTACK_TOKEN=adm DSTACK_CA_FILE=$ca
mkdir -p "$tmp/p/.dstack"
model=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print $2}')  # e.g. H200
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
  - name: ddp
    provider: torchrun
    file: allreduce.py
    resources:
      nodes: 2
      gpu: 1
EOF
cat >"$tmp/p/check_cuda.py" <<'EOF'
import torch
print("torch sees", torch.cuda.device_count(), "GPU:", torch.cuda.get_device_name(0))
x = torch.randn(4096, 4096, device="cuda")
for _ in range(200):
    y = x @ x  # a few seconds of work, so the agent's next inventory shows utilisation
torch.cuda.synchronize()
print("matmul on the GPU ok:", bool(torch.isfinite(y).all()))
EOF
cat >"$tmp/p/allreduce.py" <<'EOF'
import os
import torch
import torch.distributed as dist
dist.init_process_group("gloo")  # two ranks share this host's one GPU: NCCL would refuse
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)], device="cuda")
try:
    dist.all_reduce(t)
except RuntimeError as e:  # a gloo without CUDA support: the same over the host, said plainly
    print(f"rank {rank}: gloo all_reduce of a CUDA tensor failed ({e}); retrying through the host")
    c = t.cpu()
    dist.all_reduce(c)
    t = c.cuda()
print(f"rank {rank}/{world} node {os.environ['NODE_RANK']} master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
      f" CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')} all_reduce on {t.device}: {t.item()}"
      f" (expected {world * (world + 1) / 2})")
assert t.item() == world * (world + 1) / 2
dist.destroy_process_group()
EOF
cd "$tmp/p"
for _ in $(seq 1 100); do python3 -m dstack.cli agents --json 2>/dev/null | grep -q '"online"' && break; sleep 0.2; done
python3 -m dstack.cli agents
python3 -m dstack.cli agents --json
timeout "${RUN_TIMEOUT:-180}" python3 -m dstack.cli run gpu
echo "exit code: $?"

echo "== 3. more GPUs than any agent has"
run=$(python3 -m dstack.cli run -d too-many)
sleep 2
python3 -m dstack.cli ps
python3 -m dstack.cli ps --json | python3 -c "import json,sys; r=[x for x in json.load(sys.stdin) if x['name']=='$run'][0]; print(r['status'], '|', r.get('message'))"
python3 -m dstack.cli stop "$run"

echo "== 4. /metrics over HTTPS: the real GPU as reported"
url=$(cat "$tmp/server/http-url")
python3 - "$url" "$ca" <<'EOF'
import ssl, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
url, ca = sys.argv[1], sys.argv[2]
req = urllib.request.Request(url.rstrip("/") + "/metrics", headers={"Authorization": "Bearer adm"})
text = urllib.request.urlopen(req, context=ssl.create_default_context(cafile=ca), timeout=10).read().decode()
for fam in text_string_to_metric_families(text):
    if fam.name.startswith("dstack_gpu"):
        for s in fam.samples:
            print(s.name, s.labels, s.value)
EOF

echo "== 5. a 2-node torchrun gang, all-reduce of a CUDA tensor"
agent gpu-host-2 --runtime host
a2pid=$!
for _ in $(seq 1 100); do [ "$(python3 -m dstack.cli agents --json 2>/dev/null | grep -c '"online"')" -ge 2 ] && break; sleep 0.2; done
python3 -m dstack.cli agents
timeout "${RUN_TIMEOUT:-300}" python3 -m dstack.cli run ddp
echo "exit code: $?"
ddp=$(python3 -m dstack.cli ps --json | python3 -c "import json,sys; print([r['name'] for r in json.load(sys.stdin) if r['workflow']=='ddp'][0])")
echo "-- dstack logs $ddp --node 1"
python3 -m dstack.cli logs "$ddp" --node 1 | tail -5
kill "$a2pid"; wait "$a2pid"

kill "$apid"; wait "$apid"
echo "== agent log"; tail -5 "$tmp/gpu-host.log"

echo "== 6. a 1-GPU job in a container (--runtime docker)"
if docker info 2>/dev/null | grep -qi nvidia; then
  agent gpu-docker --runtime docker --docker-image-cuda "${CUDA_IMAGE:-nvidia/cuda:12.4.1-base-ubuntu22.04}"
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
  tail -5 "$tmp/gpu-docker.log"
else
  echo "skipped: no Docker engine with the NVIDIA runtime here"
fi
kill "$cpid"; wait "$cpid"
echo "== coordinator log"; tail -5 "$tmp/coordinator.log"
