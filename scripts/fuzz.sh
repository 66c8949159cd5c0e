#!/usr/bin/env bash
# Runs every fuzz target (parsers of untrusted bytes) for a while. Needs the nightly toolchain
# and cargo-fuzz (`cargo install cargo-fuzz --locked`). Not part of CI: fuzzing is open-ended.
# Usage: bash scripts/fuzz.sh [seconds per target, default 60]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-60}"
for t in metadata_blob agent_load listener_frame shm_frame tcp_frame; do
    echo "== $t ($secs s)"
    cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -max_len=4096
done
