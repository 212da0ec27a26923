#!/usr/bin/env bash
# Regenerates the committed Python code for the wire contract in protos/.
# Usage: tools/gen_protos.sh [OUT_ROOT]   (default: the repository root)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root}"
mkdir -p "$out/mlecs/proto/v1"
python -m grpc_tools.protoc -I "$root/protos" \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" \
  "$root"/protos/mlecs/proto/v1/*.proto
touch "$out/mlecs/proto/__init__.py" "$out/mlecs/proto/v1/__init__.py"
