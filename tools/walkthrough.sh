#!/usr/bin/env bash
# The manual path of docs/operations/running.md, end to end, as a person would type it: development
# certificates, AV-MNIST exported as dataset directories, the coordinator on PostgreSQL with mutual TLS, the
# first admin token, a federation naming its task, a one-time enrolment token per agent, three agents, a
# round, the model exported and run. tests/e2e/test_walkthrough.py runs it.
#
#   MLECS_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/mlecs tools/walkthrough.sh [WORKDIR]
#
# Settings: MLECS_DATABASE_URL (required, a PostgreSQL database), WALKTHROUGH_BACKBONE (minilm, or tiny for a
# quick run), WALKTHROUGH_GRPC_PORT / WALKTHROUGH_ADMIN_PORT (default 50051 / 8080), MLECS_BIN (default
# .venv/bin of this checkout). Everything it makes is under WORKDIR (default ./walkthrough); it stops the
# processes it started when it ends, however it ends.
set -euo pipefail

checkout="$(cd "$(dirname "$0")/.." && pwd)"
bin="${MLECS_BIN:-$checkout/.venv/bin}"
work="$(mkdir -p "${1:-walkthrough}" && cd "${1:-walkthrough}" && pwd)"
: "${MLECS_DATABASE_URL:?set MLECS_DATABASE_URL to a PostgreSQL database, e.g. postgresql://postgres@127.0.0.1:5432/mlecs}"
backbone="${WALKTHROUGH_BACKBONE:-minilm}"
grpc_port="${WALKTHROUGH_GRPC_PORT:-50051}"
admin_port="${WALKTHROUGH_ADMIN_PORT:-8080}"
cd "$work"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
step() { echo; echo "== $*"; }
alive() { local state; state="$(ps -o stat= -p "$1" 2>/dev/null)" && [[ $state != Z* ]]; }  # exited: gone or zombie
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: retries COMMAND until it succeeds
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then echo "timed out waiting for $what" >&2; exit 1; fi
    for pid in "${pids[@]}"; do  # a process it started died: waiting longer cannot help
      if ! alive "$pid"; then
        echo "a process it started (pid $pid) exited while waiting for $what; the last lines of its logs:" >&2
        tail -n 5 "$work"/*.log >&2 || true
        exit 1
      fi
    done
    sleep 1
  done
}

step "1. development certificates: a CA, the coordinator's, one per device"
"$bin/mlecs" certs init --dir certs --force
for k in 0 1 2; do "$bin/mlecs" certs device "edge-$k" --dir certs --force; done

step "2. the data: AV-MNIST as dataset directories (public/, test/, device-0..2/, task.toml)"
"$bin/mlecs" data export-avmnist --out fleet-data --devices 3
"$bin/mlecs" data check fleet-data/device-0 --task fleet-data/task.toml

step "3. the coordinator on PostgreSQL, mutual TLS on the device port"
export MLECS_STATE_DIR="$work/coordinator" MLECS_GRPC_PORT="$grpc_port" MLECS_ADMIN_PORT="$admin_port"
export MLECS_TLS_CERT_FILE="$work/certs/coordinator.pem" MLECS_TLS_KEY_FILE="$work/certs/coordinator.key"
export MLECS_TLS_CLIENT_CA_FILE="$work/certs/ca.pem"
export MLECS_TASK_DATA="{\"avmnist\": \"$work/fleet-data\"}"
"$bin/mlecs-coordinator" migrate
"$bin/mlecs-coordinator" serve > coordinator.log 2>&1 &
pids+=($!)
export MLECS_ADMIN_URL="http://127.0.0.1:$admin_port"
ready() { python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$MLECS_ADMIN_URL/readyz"; }
wait_for 120 "the admin API" ready

step "4. the first admin token (made on the same database: the command says which)"
MLECS_ADMIN_TOKEN="$("$bin/mlecs-coordinator" tokens create --name walkthrough --scope admin --quiet)"
export MLECS_ADMIN_TOKEN

step "5. a federation naming its task"
printf 'min_updates = 3\n[model]\nbackbone = "%s"\n' "$backbone" > federation.toml
"$bin/mlecs" federations create demo --task fleet-data/task.toml --config federation.toml

step "6. three agents, each with a one-time enrolment token and its own certificate and folder"
for k in 0 1 2; do
  "$bin/mlecs-coordinator" enrolment-tokens create --federation demo --device-name "edge-$k" --quiet > "edge-$k.token"
  cat > "agent-$k.toml" <<EOF
coordinator = "127.0.0.1:$grpc_port"
federation = "demo"
device_name = "edge-$k"
state_dir = "$work/agent-$k"
enrolment_token_file = "$work/edge-$k.token"
[data]
dataset = "$work/fleet-data/device-$k"
task = "$work/fleet-data/task.toml"
[tls]
ca_file = "$work/certs/ca.pem"
cert_file = "$work/certs/devices/edge-$k.pem"
key_file = "$work/certs/devices/edge-$k.key"
EOF
  "$bin/mlecs-agent" --config "agent-$k.toml" > "agent-$k.log" 2>&1 &
  pids+=($!)
done
online() { [ "$("$bin/mlecs" devices list demo --json | python3 -c 'import json, sys; print(sum(d["online"] for d in json.load(sys.stdin)))')" = 3 ]; }
wait_for 300 "three agents online" online

step "7. a round"
round="$("$bin/mlecs" rounds launch demo --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')"
committed() { "$bin/mlecs" rounds get "$round" --json | python3 -c 'import json, sys; sys.exit(json.load(sys.stdin)["state"] != "committed")'; }
wait_for 900 "round $round to commit" committed
"$bin/mlecs" rounds get "$round"

step "8. the new version as a model directory, and a prediction"
version="$("$bin/mlecs" versions list demo --json | python3 -c 'import json, sys; print(json.load(sys.stdin)[-1]["id"])')"
"$bin/mlecs" model export "$version" --out model
"$bin/mlecs" predict --model model --dataset fleet-data/test --json | tee prediction.json

step "done: everything is under $work"
