#!/usr/bin/env bash
# Runs every test: starts Redis and RabbitMQ when they do not answer, makes
# the Python client environment the cross-language tests use, builds the
# binaries the process-level tests run, then the whole suite. The tests
# that restart the shared servers run last, alone.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
need_pkg() { # command package...
  local cmd=$1; shift
  command -v "$cmd" >/dev/null && return 0
  echo "[test] installing $*" >&2
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
need_pkg python3 python3 python3-venv
need_pkg npm nodejs npm

# Python with pika for the cross-language contract tests.
if ! target/py/bin/python -c 'import pika' 2>/dev/null; then
  echo "[test] installing pika into target/py" >&2
  mkdir -p target
  python3 -m venv target/py
  # `python -m pip`, not the `pip` script: a venv moved with its target
  # directory keeps a `pip` whose first line names the old path.
  target/py/bin/python -m pip install -q pika
fi

# Node with amqplib for the same tests.
if [ ! -d target/node/node_modules/amqplib ]; then
  echo "[test] installing amqplib into target/node" >&2
  mkdir -p target/node
  (cd target/node && npm install --silent --no-audit --no-fund amqplib@0.10 >/dev/null)
fi

# Chromium and playwright-core for the dashboard's browser test, which
# must run here (not skip).
scripts/browser-test.sh --install-only
export KAIROS_BROWSER_TEST=required

cargo build --workspace --bins
cargo test --workspace --no-fail-fast
# The `otlp` feature (OpenTelemetry export, off by default): it builds, and
# its spans reach a fake collector (docs/OPERATIONS.md#tracing).
cargo test -p kairos-tests --features otlp --test otlp
# Tests that disturb the shared servers: alone, one at a time.
cargo test -p kairos-tests --features disruptive --test disruptive --test blocked_broker -- --test-threads=1
# The soak test: 2 minutes of steady load through kills and a Redis
# restart (KAIROS_SOAK_SECS to change), on its own Redis.
KAIROS_SOAK_SECS=${KAIROS_SOAK_SECS:-120} cargo test -p kairos-tests --features soak --test soak
# The benchmark harness at a tiny size: it checks counts (nothing lost,
# everything ran), never timings. The debug build is already there.
scripts/services.sh # the disruptive tests restarted them
cargo run -q -p kairos-bench -- --quick --json target/bench/quick.json
# Tests on the 3-node clusters: alone. A RabbitMQ cluster with quorum
# queues and a Redis Cluster of its own (ports 5681-5683, 7001-7006), the
# core tests on them, then nodes killed mid-run (tests/cluster_system.rs).
scripts/cluster-test.sh
