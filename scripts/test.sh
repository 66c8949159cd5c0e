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

# Python package (crates/rixl-py): build the wheel into a venv and run its pytest suite.
echo "-- python: rixl wheel + pytest"
PYTHON="${PYTHON:-python3}"
VENV=target/py-venv
if ! "$PYTHON" -m venv --help >/dev/null 2>&1 || ! "$PYTHON" -c "import ensurepip" >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip
    fi
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "maturin==1.16.0" numpy pytest
rm -rf target/wheels/rixl-*.whl
"$VENV/bin/maturin" build --release --locked -m crates/rixl-py/Cargo.toml -i "$VENV/bin/python" -o target/wheels
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps target/wheels/rixl-*.whl
(cd crates/rixl-py && "../../$VENV/bin/python" -m pytest -q -rs tests)
echo "all tests passed"
