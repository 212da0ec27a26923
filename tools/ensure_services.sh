#!/usr/bin/env bash
# Starts the local PostgreSQL and Redis that the integration tests talk to, if they are down.
set -euo pipefail
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

if ! pg_up; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  for _ in $(seq 30); do pg_up && break; sleep 1; done
fi
pg_up || { echo "PostgreSQL is not reachable on 127.0.0.1:5432: install and start it (see README)" >&2; exit 1; }

if ! redis_up; then
  if command -v redis-server >/dev/null; then
    echo "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  fi
  for _ in $(seq 30); do redis_up && break; sleep 1; done
fi
redis_up || { echo "Redis is not reachable on 127.0.0.1:6379: install and start it (see README)" >&2; exit 1; }
echo "PostgreSQL and Redis are up"

# tests/integration/test_dashboards.py runs Debian's Prometheus (the binary only: it starts its own on a free
# port). Installed when missing and apt is there; its packaged service is stopped so that port 9090 stays free.
if ! command -v prometheus >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing prometheus"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends prometheus >/dev/null || { apt-get update >/dev/null && \
    apt-get install -y --no-install-recommends prometheus >/dev/null; } || true
  if command -v systemctl >/dev/null; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
  if pid=$(cat /run/prometheus/prometheus.pid 2>/dev/null); then kill "$pid" 2>/dev/null || true; fi
fi
command -v prometheus >/dev/null || echo "prometheus is missing: tests/integration/test_dashboards.py will fail" >&2

# tests/deploy/test_compose_static.py checks docker-compose.yml with a compose implementation's own config
# check (Debian's docker-compose; no Docker engine needed). Installed when missing and apt is there.
if ! command -v docker-compose >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing docker-compose"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker-compose >/dev/null || true
fi
command -v docker-compose >/dev/null || echo "docker-compose is missing: the compose config check is skipped" >&2
