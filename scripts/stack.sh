#!/usr/bin/env bash
# Runs the whole Kairos stack on this machine: Redis and RabbitMQ (started,
# or installed and started, when needed), then one kairos-scheduler and one
# kairos-worker in the foreground until Ctrl-C. Settings come from the
# KAIROS_* environment variables (docs/CONFIGURATION.md).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
cargo build --release --bins

pids=()
stopped=""
stop() {
  trap - INT TERM
  [ -n "$stopped" ] && return
  stopped=1
  echo "[stack] stopping" >&2
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
trap stop INT TERM

target/release/kairos-scheduler & pids+=($!)
target/release/kairos-worker & pids+=($!)
echo "[stack] scheduler and worker running (namespace ${KAIROS_NAMESPACE:-kairos}); Ctrl-C stops them" >&2
wait -n "${pids[@]}" || true
stop
