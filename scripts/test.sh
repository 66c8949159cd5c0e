#!/usr/bin/env bash
# Sets up the machine, then runs every check CI runs: formatting, lints, and all tests (unit,
# property, conformance, doc tests). Usage: bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

echo "-- setup"
bash scripts/setup.sh

echo "-- cargo fmt --check"
cargo fmt --all -- --check
echo "-- cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "-- cargo test"
cargo test --workspace --locked
echo "-- benchmarks compile"
cargo bench --workspace --locked --no-run
echo "all tests passed"
