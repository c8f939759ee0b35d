#!/usr/bin/env bash
# A whole venue on this machine: builds the four programs (release) and runs
# `halftime-sim venue` with any arguments given (try --help, --keep, --rush-secs 120).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --workspace --bins
exec target/release/halftime-sim venue "$@"
