#!/usr/bin/env bash
# Celery peer: W1 burst and W2(a) precision on the same RabbitMQ (broker)
# and Redis (where tasks record what they did). Installs Celery into
# target/peers/celery on first use. Prints one JSON object on stdout.
# Usage: run.sh W1_TASKS W2_TASKS
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
venv="$root/target/peers/celery"
if ! "$venv/bin/python" -c 'import celery, redis' 2>/dev/null; then
  echo "[celery] installing into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r "$here/requirements.txt" >&2
fi
cd "$here"
exec "$venv/bin/python" bench.py "$@"
