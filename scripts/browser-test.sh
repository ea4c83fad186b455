#!/usr/bin/env bash
# The dashboard's browser test (tests/tests/dashboard.rs): installs what it
# needs, Debian's `chromium` and playwright-core from npm into target/node
# (beside the amqplib of the Node client tests), then runs it against the
# real scheduler and worker binaries.
#
#   scripts/browser-test.sh                 install, build, run the test
#   scripts/browser-test.sh --install-only  install only (scripts/test.sh, and
#                                           the test itself when one is missing)
#   scripts/browser-test.sh --screenshots   also save docs/dashboard*.png
set -euo pipefail
cd "$(dirname "$0")/.."

PLAYWRIGHT_VERSION=1.65

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
need_pkg() { # command package...
  local cmd=$1; shift
  command -v "$cmd" >/dev/null && return 0
  echo "[browser-test] installing $*" >&2
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
need_pkg chromium chromium
need_pkg npm nodejs npm

if [ ! -f target/node/node_modules/playwright-core/package.json ]; then
  echo "[browser-test] installing playwright-core into target/node" >&2
  mkdir -p target/node
  # playwright-core ships no browser and downloads none: it drives the
  # system's chromium.
  (cd target/node && npm install --silent --no-audit --no-fund "playwright-core@$PLAYWRIGHT_VERSION" >/dev/null)
fi

case "${1:-}" in
  --install-only) exit 0 ;;
  --screenshots) export KAIROS_UI_SCREENSHOTS=docs ;;
  "") ;;
  *) echo "usage: $0 [--install-only|--screenshots]" >&2; exit 2 ;;
esac

cargo build -p kairos-scheduler -p kairos-worker --bins
KAIROS_BROWSER_TEST=required cargo test -p kairos-tests --test dashboard -- --nocapture
