#!/usr/bin/env bash
# Runs every test: starts Redis and RabbitMQ when they do not answer, makes
# the Python client environment the cross-language tests use, builds the
# binaries the process-level tests run, then the whole suite. The tests
# that restart the shared servers run last, alone.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh

# Python with pika for the cross-language contract tests.
if ! target/py/bin/python -c 'import pika' 2>/dev/null; then
  echo "[test] installing pika into target/py" >&2
  mkdir -p target
  python3 -m venv target/py
  target/py/bin/pip install -q pika
fi

cargo build --workspace --bins
cargo test --workspace
# Tests that disturb the shared servers: alone, one at a time.
cargo test -p kairos-tests --features disruptive --test disruptive -- --test-threads=1
# The benchmark harness at a tiny size: it checks counts (nothing lost,
# everything ran), never timings. The debug build is already there.
scripts/services.sh # the disruptive tests restarted them
cargo run -q -p kairos-bench -- --quick --json target/bench/quick.json
