#!/usr/bin/env bash
# Makes sure Redis (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672) answer:
# starts them when they do not, installing them from Debian packages when
# they are missing. Safe to run again: servers that answer are left alone.
set -euo pipefail

REDIS_PORT="${KAIROS_REDIS_PORT:-6379}"
AMQP_PORT="${KAIROS_AMQP_PORT:-5672}"

log() { printf '[services] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=""
install_pkg() {
  log "installing $*"
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port seconds name
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    if port_open "$1"; then return 0; fi
    sleep 0.1
  done
  log "$3 did not open port $1 within $2 s"
  return 1
}

ensure_redis() {
  if command -v redis-cli >/dev/null && redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
    log "redis answers on $REDIS_PORT"
    return
  fi
  command -v redis-server >/dev/null || install_pkg redis-server
  log "starting redis on $REDIS_PORT"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no >/dev/null
  wait_port "$REDIS_PORT" 20 redis
}

ensure_rabbitmq() {
  if port_open "$AMQP_PORT" && rabbitmqctl -q status >/dev/null 2>&1; then
    log "rabbitmq answers on $AMQP_PORT"
    return
  fi
  command -v rabbitmq-server >/dev/null || install_pkg rabbitmq-server
  if ! rabbitmqctl -q status >/dev/null 2>&1; then
    log "starting rabbitmq"
    rabbitmq-server -detached >/dev/null 2>&1 || true
  fi
  # The node may run with its app stopped (after `rabbitmqctl stop_app`).
  rabbitmqctl -q await_startup --timeout 120 >/dev/null 2>&1 || true
  if ! port_open "$AMQP_PORT"; then
    rabbitmqctl -q start_app >/dev/null 2>&1 || true
  fi
  wait_port "$AMQP_PORT" 120 rabbitmq
  log "rabbitmq answers on $AMQP_PORT"
}

ensure_redis
ensure_rabbitmq
