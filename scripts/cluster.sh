#!/usr/bin/env bash
# A RabbitMQ cluster of 3 nodes and a Redis Cluster of 3 masters and 3
# replicas, all on this host's loopback, beside (never instead of) the
# default servers on 5672 and 6379.
#
#   scripts/cluster.sh up                  start both, wait until healthy,
#                                          print the KAIROS_* settings to use
#   scripts/cluster.sh env                 print those settings again
#   scripts/cluster.sh status              what runs, per node
#   scripts/cluster.sh stop rabbit N       kill -9 RabbitMQ node N (1..3)
#   scripts/cluster.sh stop redis-master N kill -9 the Redis master serving
#                                          the N-th slot range (1..3)
#   scripts/cluster.sh start rabbit N      start a stopped RabbitMQ node again
#   scripts/cluster.sh start redis PORT    start a stopped Redis node again
#   scripts/cluster.sh down                stop and remove all it started
#
# Everything lives under $KAIROS_CLUSTER_DIR (default /tmp/kairos-cluster):
# data, logs, pid files and the Erlang cookie the three RabbitMQ nodes
# share. `down` kills only the processes whose pid files are there.
# Ports: AMQP 5681-5683 (KAIROS_CLUSTER_AMQP_BASE=5680), Erlang
# distribution 25681-25683, Redis 7001-7006 (KAIROS_CLUSTER_REDIS_BASE=7000).
# RabbitMQ node names are NAME1..NAME3@localhost (KAIROS_CLUSTER_NAME=kairos):
# two clusters on one host need different names, ports and directories.
set -euo pipefail

DIR="${KAIROS_CLUSTER_DIR:-/tmp/kairos-cluster}"
AMQP_BASE="${KAIROS_CLUSTER_AMQP_BASE:-5680}"
DIST_BASE=$((AMQP_BASE + 20000))
REDIS_BASE="${KAIROS_CLUSTER_REDIS_BASE:-7000}"
RABBIT_BIN=/usr/lib/rabbitmq/bin
HOST=localhost
NAME="${KAIROS_CLUSTER_NAME:-kairos}"

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

node_name() { echo "$NAME$1@$HOST"; }

# The environment one RabbitMQ node (and rabbitmqctl talking to it) runs in:
# its own env file (not /etc/rabbitmq's), config, data and cookie.
rabbit_env() { # N
  local n=$1 d="$DIR/rabbit$1"
  export HOME="$DIR/home"
  export RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf"
  export RABBITMQ_NODENAME
  RABBITMQ_NODENAME=$(node_name "$n")
  export RABBITMQ_NODE_PORT=$((AMQP_BASE + n))
  export RABBITMQ_DIST_PORT=$((DIST_BASE + n))
  export RABBITMQ_CONFIG_FILE="$d/rabbitmq"
  export RABBITMQ_MNESIA_BASE="$d/mnesia"
  export RABBITMQ_LOG_BASE="$d/log"
  export RABBITMQ_PID_FILE="$d/pid"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins"
  export RABBITMQ_PLUGINS_EXPAND_DIR="$d/plugins-expand"
  export ERL_EPMD_ADDRESS=127.0.0.1
}

ctl() { # N args...
  local n=$1; shift
  (rabbit_env "$n"; "$RABBIT_BIN/rabbitmqctl" -n "$(node_name "$n")" "$@")
}

rabbit_start() { # N
  local n=$1 d="$DIR/rabbit$1"
  mkdir -p "$d/mnesia" "$d/log"
  cat >"$d/rabbitmq-env.conf" <<EOF
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
  cat >"$d/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$((AMQP_BASE + n))
cluster_partition_handling = pause_minority
EOF
  echo '[].' >"$d/enabled_plugins"
  log "starting RabbitMQ node $(node_name "$n") on port $((AMQP_BASE + n))"
  (rabbit_env "$n"; "$RABBIT_BIN/rabbitmq-server" -detached >>"$d/log/startup.log" 2>&1)
  # await_startup fails at once while the node has not registered with
  # epmd yet: ask again until it answers.
  for _ in $(seq 120); do
    ctl "$n" -q await_startup --timeout 120 >/dev/null 2>&1 && return 0
    sleep 1
  done
  die "RabbitMQ node $n did not start (see $d/log)"
}

rabbit_up() {
  mkdir -p "$DIR/home"
  if [ ! -f "$DIR/home/.erlang.cookie" ]; then
    # One cookie for the three nodes (and rabbitmqctl), not the system's.
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/home/.erlang.cookie"
    chmod 400 "$DIR/home/.erlang.cookie"
  fi
  for n in 1 2 3; do
    port_open $((AMQP_BASE + n)) && die "port $((AMQP_BASE + n)) is taken (a cluster already up? scripts/cluster.sh down)"
    rabbit_start "$n"
  done
  for n in 2 3; do
    ctl "$n" -q stop_app
    ctl "$n" -q join_cluster "$(node_name 1)"
    ctl "$n" -q start_app
  done
  ctl 1 -q await_online_nodes 3 --timeout 120 >/dev/null
  log "RabbitMQ cluster of 3 nodes is up"
}

redis_port() { echo $((REDIS_BASE + $1)); }

redis_start() { # port
  local port=$1 d="$DIR/redis$1"
  mkdir -p "$d"
  redis-server --port "$port" --bind 127.0.0.1 --daemonize yes \
    --dir "$d" --pidfile "$d/pid" --logfile "$d/log" \
    --cluster-enabled yes --cluster-config-file "$d/nodes.conf" \
    --cluster-node-timeout 2000 --cluster-replica-validity-factor 0 \
    --repl-ping-replica-period 1 --save "" --appendonly no >/dev/null
  for _ in $(seq 100); do port_open "$port" && return 0; sleep 0.1; done
  die "redis on $port did not start (see $d/log)"
}

redis_up() {
  command -v redis-server >/dev/null || die "redis-server is missing (apt-get install redis-server)"
  local nodes=()
  for i in 1 2 3 4 5 6; do
    local port
    port=$(redis_port "$i")
    port_open "$port" && die "port $port is taken (a cluster already up? scripts/cluster.sh down)"
    redis_start "$port"
    nodes+=("127.0.0.1:$port")
  done
  log "creating the Redis Cluster (3 masters, 3 replicas)"
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$DIR/redis-create.log" 2>&1 \
    || die "redis-cli --cluster create failed (see $DIR/redis-create.log)"
  redis_wait_ok
  log "Redis Cluster is up"
}

# Every node says cluster_state:ok and the cluster knows 3 masters with a
# replica each.
redis_wait_ok() {
  for _ in $(seq 300); do
    local ok=1
    for i in 1 2 3 4 5 6; do
      local port
      port=$(redis_port "$i")
      port_open "$port" || continue
      redis-cli -p "$port" cluster info 2>/dev/null | grep -q 'cluster_state:ok' || ok=0
    done
    if [ $ok = 1 ] && [ "$(redis-cli -p "$(redis_port 1)" cluster nodes 2>/dev/null | grep -c ' slave ')" -ge 3 ]; then
      return 0
    fi
    sleep 0.2
  done
  die "the Redis Cluster did not become healthy"
}

print_env() {
  local urls=() seeds=()
  for n in 1 2 3; do urls+=("amqp://guest:guest@127.0.0.1:$((AMQP_BASE + n))/%2f"); done
  for i in 1 2 3 4 5 6; do seeds+=("127.0.0.1:$(redis_port "$i")"); done
  local IFS=,
  echo "KAIROS_AMQP_URL=${urls[*]}"
  echo "KAIROS_REDIS_URL=redis+cluster://${seeds[*]}"
  echo "KAIROS_QUEUE_MODE=quorum"
}

kill_pidfile() { # file
  [ -f "$1" ] || return 0
  local pid
  pid=$(cat "$1")
  [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
  rm -f "$1"
}

stop_rabbit() { # N
  local n=$1
  [[ "$n" =~ ^[123]$ ]] || die "stop rabbit N: N is 1, 2 or 3"
  log "kill -9 RabbitMQ node $(node_name "$n")"
  kill_pidfile "$DIR/rabbit$n/pid"
}

# The master serving the N-th slot range, by the ranges' first slot: the
# same N names the same slots after a failover moved them to a replica.
master_port() { # N
  redis-cli -p "$1" cluster nodes 2>/dev/null | awk '$3 ~ /master/ && $3 !~ /fail/ && $9 != "" {split($2, a, "[:@]"); split($9, s, "-"); print s[1], a[2]}' | sort -n | awk -v n="$2" 'NR == n {print $2}'
}

stop_redis_master() { # N
  local n=$1 port="" any
  [[ "$n" =~ ^[123]$ ]] || die "stop redis-master N: N is 1, 2 or 3"
  for i in 1 2 3 4 5 6; do
    any=$(redis_port "$i")
    port_open "$any" || continue
    port=$(master_port "$any" "$n")
    [ -n "$port" ] && break
  done
  [ -n "$port" ] || die "no live master serves slot range $n"
  log "kill -9 the Redis master on $port (slot range $n)"
  kill_pidfile "$DIR/redis$port/pid"
}

status() {
  for n in 1 2 3; do
    if port_open $((AMQP_BASE + n)); then s=up; else s=down; fi
    echo "rabbit $n $(node_name "$n") port $((AMQP_BASE + n)) $s"
  done
  for i in 1 2 3 4 5 6; do
    local port role=down
    port=$(redis_port "$i")
    if port_open "$port"; then
      role=$(redis-cli -p "$port" role 2>/dev/null | head -1)
    fi
    echo "redis $port $role"
  done
}

down() {
  for n in 1 2 3; do kill_pidfile "$DIR/rabbit$n/pid"; done
  for i in 1 2 3 4 5 6; do kill_pidfile "$DIR/redis$(redis_port "$i")/pid"; done
  # Killed nodes leave their Erlang names registered a moment in epmd.
  rm -rf "$DIR"
  log "cluster stopped and removed"
}

case "${1:-}" in
  up)
    command -v "$RABBIT_BIN/rabbitmq-server" >/dev/null || die "RabbitMQ is missing (apt-get install rabbitmq-server)"
    mkdir -p "$DIR"
    rabbit_up
    redis_up
    print_env
    ;;
  env) print_env ;;
  status) status ;;
  stop)
    case "${2:-}" in
      rabbit) stop_rabbit "${3:-}" ;;
      redis-master) stop_redis_master "${3:-}" ;;
      *) die "stop rabbit N | stop redis-master N" ;;
    esac
    ;;
  start)
    case "${2:-}" in
      rabbit) rabbit_start "${3:?N}" ;;
      redis) redis_start "${3:?PORT}" ;;
      *) die "start rabbit N | start redis PORT" ;;
    esac
    ;;
  down) down ;;
  *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
