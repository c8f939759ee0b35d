#!/usr/bin/env bash
# The whole test suite. Starts what the tests need on a fresh machine, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# Postgres (used by the relay's tests once it exists) must be up; start it if it is down.
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
fi

# The browser test (peer/tests/browser.rs) drives Debian's chromium through chromedriver.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  echo "== installing chromium and chromium-driver (apt-get) for the browser test"
  if [ "$(id -u)" -ne 0 ]; then
    echo "chromium/chromedriver missing and not root: run apt-get install -y chromium chromium-driver" >&2
    exit 1
  fi
  (set -x; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)
  chromium --version
  chromedriver --version
fi

echo "== building tests"
cargo build --workspace --tests --locked
echo "== running tests"
cargo test --workspace --locked
