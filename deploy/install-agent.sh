#!/usr/bin/env bash
# Installs, upgrades or removes the mlecs edge agent as a systemd service. Run `install-agent.sh --help`.
# The layout it owns (every path under --root DIR when given):
#   /opt/mlecs/venvs/<version>/   one virtualenv per install/upgrade; /opt/mlecs/venv links the current one
#   /etc/mlecs/agent.toml         the agent config (root:mlecs 0640; never overwritten by an upgrade)
#   /etc/mlecs/certs/             ca.pem, device.pem, device.key (key root:mlecs 0640)
#   /etc/mlecs/enrolment-token    the one-time enrolment token, when given (root:mlecs 0640)
#   /etc/systemd/system/mlecs-agent.service
#   /var/lib/mlecs-agent/         durable state (systemd's StateDirectory; kept unless uninstall --purge)
set -euo pipefail
umask 022  # the virtualenv must be readable by the service user; secrets get their modes explicitly

PROG=install-agent.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SERVICE=mlecs-agent
SERVICE_USER=mlecs

usage() {
    cat <<EOF
Usage: $PROG install|upgrade|uninstall [options]

  install     create the service user, a virtualenv under /opt/mlecs, /etc/mlecs/agent.toml, the
              certificates and the systemd unit, then enable and start the service
  upgrade     build a new virtualenv, check the config with it, switch to it atomically and restart the
              service; config, certificates and state are kept
  uninstall   stop and disable the service, remove the unit and /opt/mlecs; with --purge also
              /etc/mlecs (config, certificates, token), the state in /var/lib/mlecs-agent and the user

Options:
  --config FILE           agent config to install as /etc/mlecs/agent.toml (required by install unless one
                          is already there; upgrade never overwrites it and leaves FILE as agent.toml.new)
  --certs DIR             DIR/ca.pem plus one device certificate NAME.pem with its NAME.key (as written by
                          \`mlecs certs device NAME\`), installed as /etc/mlecs/certs/{ca,device}.pem and
                          device.key; DIR must not hold the CA's private key ca.key
  --enrolment-token FILE  the one-time enrolment token, installed as /etc/mlecs/enrolment-token
  --source PATH           what to install: an mlecs wheel or source directory (default: the checkout this
                          script belongs to, $(dirname "$HERE"))
  --python PY             interpreter for the virtualenv, Python >= 3.11 (default: python3)
  --torch SPEC            torch requirement installed before mlecs so that pip takes the CPU wheel
                          (default: torch==2.13.0)
  --reuse-packages VENV   development and tests only: make VENV's installed packages visible to the new
                          virtualenv instead of downloading them (torch, transformers, ...) and install
                          --source without dependencies and without network
  --root DIR              install under DIR instead of / (a throwaway root: implies --no-systemd)
  --no-systemd            do not create the user, change owners or call systemctl
  --no-start              install and enable the service but do not start it
  --purge                 uninstall: also remove config, certificates, token, state and the user
  -h, --help              this help

Exit codes: 0 done, 1 a step failed (the previous installation is left as it was), 2 usage error.
EOF
}

say() { echo "$PROG: $*"; }
die() { echo "$PROG: error: $*" >&2; exit 1; }
usage_error() { echo "$PROG: $*" >&2; echo "Run '$PROG --help' for the options." >&2; exit 2; }

ACTION=""
ROOT=""
SYSTEMD=1
START=1
PURGE=0
CONFIG=""
CERTS=""
TOKEN=""
SOURCE=""
PYTHON=python3
TORCH_SPEC="torch==2.13.0"
REUSE=""

need_value() { [[ $# -ge 2 && -n "$2" ]] || usage_error "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        install|upgrade|uninstall)
            [[ -z "$ACTION" ]] || usage_error "one action only (got $ACTION and $1)"
            ACTION=$1 ;;
        --config) need_value "$@"; CONFIG=$2; shift ;;
        --certs) need_value "$@"; CERTS=$2; shift ;;
        --enrolment-token) need_value "$@"; TOKEN=$2; shift ;;
        --source|--wheel) need_value "$@"; SOURCE=$2; shift ;;
        --python) need_value "$@"; PYTHON=$2; shift ;;
        --torch) need_value "$@"; TORCH_SPEC=$2; shift ;;
        --reuse-packages) need_value "$@"; REUSE=$2; shift ;;
        --root) need_value "$@"; ROOT=$2; shift ;;
        --no-systemd) SYSTEMD=0 ;;
        --no-start) START=0 ;;
        --purge) PURGE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage_error "unknown argument: $1" ;;
    esac
    shift
done
[[ -n "$ACTION" ]] || usage_error "say what to do: install, upgrade or uninstall"
[[ "$PURGE" == 0 || "$ACTION" == uninstall ]] || usage_error "--purge goes with uninstall only"

if [[ -n "$ROOT" ]]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
    [[ "$ROOT" != / ]] || ROOT=""
fi
[[ -z "$ROOT" ]] || SYSTEMD=0  # a throwaway root is not the running system: no users, owners or systemctl
if [[ "$SYSTEMD" == 1 ]]; then
    [[ $(id -u) == 0 ]] || die "run as root (or use --root DIR / --no-systemd to install into a directory)"
    command -v systemctl >/dev/null || die "systemctl not found: this installer sets the agent up as a systemd service"
fi

OPT=$ROOT/opt/mlecs
VENV_LINK=$OPT/venv
VENVS=$OPT/venvs
ETC=$ROOT/etc/mlecs
CERT_DIR=$ETC/certs
UNIT=$ROOT/etc/systemd/system/$SERVICE.service
STATE=$ROOT/var/lib/$SERVICE
UNIT_SOURCE=$HERE/systemd/$SERVICE.service

# Owner for the files the agent reads: root owns them, the service's group may read them.
give_to_service() {  # MODE PATH...
    local mode=$1; shift
    chmod "$mode" "$@"
    if [[ "$SYSTEMD" == 1 ]]; then chown "root:$SERVICE_USER" "$@"; fi
}

ensure_user() {
    [[ "$SYSTEMD" == 1 ]] || return 0
    if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
        useradd --system --user-group --home-dir "/var/lib/$SERVICE" --no-create-home \
            --shell /usr/sbin/nologin --comment "mlecs edge agent" "$SERVICE_USER"
        say "created system user $SERVICE_USER"
    fi
}

# Builds a new virtualenv in VENVS (NEW_VENV); the current one is untouched until switch_venv.
NEW_VENV=""
cleanup_new_venv() { if [[ -n "$NEW_VENV" && -d "$NEW_VENV" ]]; then rm -rf "$NEW_VENV"; fi; }
build_venv() {
    local source=${SOURCE:-$(dirname "$HERE")}
    [[ -e "$source" ]] || die "--source $source does not exist"
    source=$(cd "$(dirname "$source")" && pwd)/$(basename "$source")
    [[ -f "$source" || -f "$source/pyproject.toml" ]] || die "--source $source is neither a wheel nor a source directory"
    command -v "$PYTHON" >/dev/null || die "--python $PYTHON not found"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "--python $PYTHON is older than Python 3.11"
    mkdir -p "$VENVS"
    NEW_VENV=$VENVS/$(date -u +%Y%m%dT%H%M%SZ)-$$
    trap cleanup_new_venv EXIT
    say "building $NEW_VENV from $source"
    "$PYTHON" -m venv "$NEW_VENV"
    local pip=("$NEW_VENV/bin/python" -m pip --disable-pip-version-check --quiet)
    if [[ -n "$REUSE" ]]; then
        local site
        site=$("$REUSE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
            || die "--reuse-packages $REUSE is not a virtualenv"
        "$NEW_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
            | { read -r own; echo "$site" > "$own/zz-reused-packages.pth"; }
        local flags=(--no-deps --no-index)
        [[ -f "$source" ]] || flags+=(--no-build-isolation)
        "${pip[@]}" install "${flags[@]}" "$source"
    else
        "${pip[@]}" install --upgrade pip
        "${pip[@]}" install "$TORCH_SPEC"
        "${pip[@]}" install "$source[edge]"
    fi
    [[ -x "$NEW_VENV/bin/mlecs-agent" ]] || die "the new virtualenv has no mlecs-agent entry point"
}

# Points VENV_LINK at NEW_VENV with one rename, so the service never sees a half-built virtualenv.
switch_venv() {
    ln -sfn "venvs/$(basename "$NEW_VENV")" "$OPT/venv.next"
    mv -T "$OPT/venv.next" "$VENV_LINK"
    trap - EXIT
}

# Removes the virtualenvs other than the current one: only after the restart, since the old process may
# still import modules from its own.
prune_venvs() {
    local keep old
    keep=$(basename "$NEW_VENV")
    for old in "$VENVS"/*; do
        [[ "$(basename "$old")" == "$keep" ]] || rm -rf "$old"
    done
    NEW_VENV=""
}

# Checks the given files before anything is built or changed; sets DEVICE_PEM.
DEVICE_PEM=""
check_inputs() {
    [[ -z "$CONFIG" || -f "$CONFIG" ]] || die "--config $CONFIG is not a file"
    [[ -z "$TOKEN" || -f "$TOKEN" ]] || die "--enrolment-token $TOKEN is not a file"
    [[ -n "$CERTS" ]] || return 0
    [[ -d "$CERTS" ]] || die "--certs $CERTS is not a directory"
    [[ ! -e "$CERTS/ca.key" ]] || die "--certs $CERTS holds the CA's private key ca.key: keep it off devices; pass a directory with ca.pem and the device's NAME.pem and NAME.key only"
    [[ -f "$CERTS/ca.pem" ]] || die "--certs $CERTS has no ca.pem (the CA certificate)"
    local pairs=() pem
    for pem in "$CERTS"/*.pem; do
        if [[ "$(basename "$pem")" != ca.pem && -f "${pem%.pem}.key" ]]; then pairs+=("$pem"); fi
    done
    [[ ${#pairs[@]} == 1 ]] || die "--certs $CERTS must hold exactly one device certificate NAME.pem with its NAME.key besides ca.pem (found ${#pairs[@]})"
    DEVICE_PEM=${pairs[0]}
}

install_certs() {
    [[ -n "$CERTS" ]] || return 0
    mkdir -p "$CERT_DIR"
    give_to_service 0750 "$ETC" "$CERT_DIR"
    install -m 0644 "$CERTS/ca.pem" "$CERT_DIR/ca.pem"
    install -m 0644 "$DEVICE_PEM" "$CERT_DIR/device.pem"
    install -m 0600 "${DEVICE_PEM%.pem}.key" "$CERT_DIR/device.key.new"
    give_to_service 0640 "$CERT_DIR/device.key.new"
    mv -f "$CERT_DIR/device.key.new" "$CERT_DIR/device.key"
    say "installed certificates in $CERT_DIR (device certificate from $(basename "$DEVICE_PEM"))"
}

install_secret_file() {  # SOURCE DEST
    install -m 0600 "$1" "$2.new"
    give_to_service 0640 "$2.new"
    mv -f "$2.new" "$2"
}

install_config() {
    mkdir -p "$ETC"
    give_to_service 0750 "$ETC"
    if [[ -n "$TOKEN" ]]; then
        install_secret_file "$TOKEN" "$ETC/enrolment-token"
        say "installed the enrolment token as $ETC/enrolment-token"
    fi
    if [[ -n "$CONFIG" ]]; then
        if [[ -e "$ETC/agent.toml" ]]; then
            install_secret_file "$CONFIG" "$ETC/agent.toml.new"
            say "kept $ETC/agent.toml; the given config is in agent.toml.new (compare, then move it yourself)"
        else
            install_secret_file "$CONFIG" "$ETC/agent.toml"
            say "installed $ETC/agent.toml"
        fi
    fi
    [[ -f "$ETC/agent.toml" ]] || die "no $ETC/agent.toml: pass --config FILE"
}

# Checks the installed config with the new virtualenv, as the service user where there is one.
check_config() {
    local cmd=("$NEW_VENV/bin/mlecs-agent" --config "$ETC/agent.toml" --check-config) out
    if [[ "$SYSTEMD" == 1 ]] && command -v runuser >/dev/null; then cmd=(runuser -u "$SERVICE_USER" -- "${cmd[@]}"); fi
    out=$(cd / && HF_HUB_OFFLINE=1 "${cmd[@]}" 2>&1) || die "the config does not work with this version: $out"
    [[ "$out" == *"state_dir=$STATE "* ]] \
        || die "$ETC/agent.toml must keep state_dir = \"/var/lib/$SERVICE\" (or leave it unset): the service may write nowhere else. The agent said: $out"
    say "$out"
}

install_unit() {
    [[ -f "$UNIT_SOURCE" ]] || die "unit file $UNIT_SOURCE not found next to this script"
    mkdir -p "$(dirname "$UNIT")"
    install -m 0644 "$UNIT_SOURCE" "$UNIT"
    if [[ "$SYSTEMD" == 0 ]]; then mkdir -p "$STATE" && chmod 0700 "$STATE"; fi  # systemd creates it itself
}

do_install() {
    [[ ! -e "$VENV_LINK" ]] || die "already installed in $OPT: use upgrade (or uninstall first)"
    [[ -n "$CONFIG" || -f "$ETC/agent.toml" ]] || die "no $ETC/agent.toml yet: pass --config FILE"
    check_inputs
    ensure_user
    build_venv
    install_certs
    install_config
    check_config
    install_unit
    switch_venv
    prune_venvs  # leftovers of an interrupted earlier attempt
    if [[ "$SYSTEMD" == 1 ]]; then
        systemctl daemon-reload
        if [[ "$START" == 1 ]]; then systemctl enable --now "$SERVICE"; else systemctl enable "$SERVICE"; fi
        say "installed; follow it with: journalctl -u $SERVICE -f"
    else
        say "installed under ${ROOT:-/} (no systemd calls)"
    fi
}

do_upgrade() {
    [[ -L "$VENV_LINK" ]] || die "not installed in $OPT: use install"
    check_inputs
    ensure_user
    build_venv
    install_certs
    install_config
    check_config
    install_unit
    switch_venv
    if [[ "$SYSTEMD" == 1 ]]; then
        systemctl daemon-reload
        systemctl try-restart "$SERVICE"
    fi
    prune_venvs
    say "upgraded; config, certificates and state kept"
}

do_uninstall() {
    if [[ "$SYSTEMD" == 1 ]]; then
        systemctl disable --now "$SERVICE" 2>/dev/null || true
    fi
    rm -f "$UNIT"
    if [[ "$SYSTEMD" == 1 ]]; then
        systemctl daemon-reload
        systemctl reset-failed "$SERVICE" 2>/dev/null || true
    fi
    rm -rf "$OPT"
    if [[ "$PURGE" == 1 ]]; then
        rm -rf "$ETC" "$STATE"
        if [[ "$SYSTEMD" == 1 ]] && id -u "$SERVICE_USER" >/dev/null 2>&1; then userdel "$SERVICE_USER"; fi
        say "removed the agent, its config, certificates and state"
    else
        say "removed the agent; kept $ETC and $STATE (uninstall --purge removes them)"
    fi
}

"do_$ACTION"
