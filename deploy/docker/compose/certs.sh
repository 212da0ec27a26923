#!/bin/sh
# The one-shot `certs` service of docker-compose.yml: a development CA, the coordinator's certificate and one
# client certificate per device, made on the first `up` and kept (the CA key never leaves $MLECS_PKI_DIR,
# a volume only this service mounts). Each party gets only its own files, in its own volume:
#   $MLECS_TLS_ROOT/coordinator/{ca.pem,coordinator.pem,coordinator.key}
#   $MLECS_TLS_ROOT/DEVICE/{ca.pem,device.pem,device.key}
# Usage: certs.sh DEVICE...   (runs as root so that it can hand the files to the services' user)
set -eu
pki=${MLECS_PKI_DIR:-/srv/mlecs/pki}
out=${MLECS_TLS_ROOT:-/srv/mlecs/tls}
owner=${MLECS_TLS_OWNER-10001:10001}  # the uid the coordinator and agent images run as; empty: leave as is

if [ ! -f "$pki/ca.pem" ]; then
    # "coordinator" is the name agents dial on the compose network; localhost for a published port.
    mlecs certs init --dir "$pki" --san coordinator --san localhost --san 127.0.0.1
fi
mkdir -p "$out/coordinator"
cp "$pki/ca.pem" "$pki/coordinator.pem" "$pki/coordinator.key" "$out/coordinator/"
for device in "$@"; do
    [ -f "$pki/devices/$device.pem" ] || mlecs certs device "$device" --dir "$pki"
    mkdir -p "$out/$device"
    cp "$pki/ca.pem" "$out/$device/ca.pem"
    cp "$pki/devices/$device.pem" "$out/$device/device.pem"
    cp "$pki/devices/$device.key" "$out/$device/device.key"
done
chmod 600 "$out"/*/*.key
if [ -n "$owner" ]; then chown -R "$owner" "$out"; fi
echo "certificates ready for the coordinator and: $*"
