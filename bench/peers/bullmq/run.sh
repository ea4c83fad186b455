#!/usr/bin/env bash
# BullMQ peer: W1 burst and W2(a) precision on the same Redis. Installs
# BullMQ into target/peers/bullmq on first use. Prints one JSON object.
# Usage: run.sh W1_TASKS W2_TASKS
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
dir="$root/target/peers/bullmq"
if ! cmp -s "$here/package.json" "$dir/package.json" || [ ! -d "$dir/node_modules/bullmq" ]; then
  echo "[bullmq] installing into $dir" >&2
  mkdir -p "$dir"
  cp "$here/package.json" "$dir/"
  (cd "$dir" && npm install --no-audit --no-fund --loglevel=error >&2)
fi
NODE_PATH="$dir/node_modules" exec node "$here/bench.js" "$@"
