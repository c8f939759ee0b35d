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

echo "== building tests"
cargo build --workspace --tests --locked
echo "== running tests"
cargo test --workspace --locked
