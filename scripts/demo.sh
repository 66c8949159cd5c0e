#!/usr/bin/env bash
# Sets up the machine and runs RIXL's main demo: two processes on this host (a prefill and a
# decode worker) exchange metadata over the listener and move KV-cache pages with the SHM
# backend, then report what moved and how fast. Usage: bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/setup.sh >/dev/null
cargo run --release --locked -q -p rixl --example two_process_demo
