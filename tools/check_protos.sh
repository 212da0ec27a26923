#!/usr/bin/env bash
# Fails when the committed generated code differs from what protos/ generates now.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$root/tools/gen_protos.sh" "$tmp" >/dev/null
if ! diff -r "$tmp/mlecs/proto" "$root/mlecs/proto" -x __pycache__ >/dev/null; then
  diff -r "$tmp/mlecs/proto" "$root/mlecs/proto" -x __pycache__ | head -40
  echo "generated protobuf code is stale: run 'make protos' and commit the result" >&2
  exit 1
fi
echo "generated protobuf code is up to date"
