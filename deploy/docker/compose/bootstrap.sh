#!/bin/sh
# The one-shot `bootstrap` service of docker-compose.yml, run once the coordinator is ready: creates the
# federation (if it does not exist yet) from a config file, and a one-time enrolment token for each device
# that has none yet, into that device's TLS volume (the agents read it as enrolment_token_file).
# Usage: bootstrap.sh FEDERATION CONFIG_FILE DEVICE...
# Needs MLECS_ADMIN_URL and the coordinator's MLECS_* database settings (it makes its own short-lived token).
set -eu
federation=$1 config=$2
shift 2
out=${MLECS_TLS_ROOT:-/srv/mlecs/tls}
owner=${MLECS_TLS_OWNER-10001:10001}

MLECS_ADMIN_TOKEN=$(mlecs-coordinator tokens create --name compose-bootstrap --scope operate \
                    --expires-in-days 1 --quiet)
export MLECS_ADMIN_TOKEN
if mlecs federations get "$federation" > /dev/null 2>&1; then
    echo "federation $federation exists"
else
    mlecs federations create "$federation" --config "$config"
fi
for device in "$@"; do
    token_file="$out/$device/enrolment.token"
    if [ ! -s "$token_file" ]; then
        mlecs-coordinator enrolment-tokens create --federation "$federation" --device-name "$device" \
            --quiet > "$token_file.new"
        chmod 600 "$token_file.new"
        if [ -n "$owner" ]; then chown "$owner" "$token_file.new"; fi
        mv "$token_file.new" "$token_file"
        echo "enrolment token issued for $device"
    fi
done
