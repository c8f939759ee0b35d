#!/usr/bin/env bash
# A whole venue on this machine: builds the programs and runs `halftime-sim venue` with any
# arguments given (try --help, --keep, --rush-secs 120, --policy optimistic).
# The build is the test suite's own (dependencies optimised even in this profile), so running
# both set-up commands compiles once.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --tests --locked
exec target/debug/halftime-sim venue "$@"
