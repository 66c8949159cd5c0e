#!/usr/bin/env bash
# Sets up the machine and runs RIXL's main demo: two agents move a KV-cache-shaped set of pages
# and report what moved and how fast. Usage: bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/setup.sh >/dev/null
cargo run --release --locked -q -p rixl --example loopback_demo
