#!/usr/bin/env bash
# Regenerates the Python code for protos/v1/*.proto. Usage: protos/generate.sh [OUTDIR]
# With OUTDIR the code is written there instead (used by .ci/run to detect stale code).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
cd "$root"
python -m grpc_tools.protoc -I. --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
  dstack/protos/v1/common.proto dstack/protos/v1/client.proto dstack/protos/v1/agent.proto
