#!/usr/bin/env bash
# RIXL's TCP backend and NIXL 1.5.1 (UCX_TLS=tcp) side by side across hosts: the target
# process of each benchmark runs in its own network namespace, joined to this one by a veth
# pair, so every byte crosses a (virtual) link instead of loopback. Needs root.
#
#   bash crates/rixl-tcp/bench/netns_compare.sh [ROUNDS] [tcp_bench arguments...]
#
# Each round runs `tcp_bench` (RIXL, with its plain-socket floors), then
# `nixl_tcp_compare.py` (NIXL), each under `flock /tmp/rixl-bench.lock` so that they never
# overlap other benchmarks. Environment: MTU of the link (default 1500, as a real NIC;
# 65535 matches loopback), NIXL_PY (a Python with nixl-cu12==1.5.1; NIXL is skipped, saying
# so, when it is missing), BENCH (a built tcp_bench; built with cargo when unset).
set -euo pipefail
cd "$(dirname "$0")/../../.."
rounds=${1:-1}
shift || true
mtu=${MTU:-1500}
nixl_py=${NIXL_PY:-/work/nixl-venv/bin/python}
ns=rixl-bench-$$
host_if=rb$$a
peer_if=rb$$b
octet=$((1 + $$ % 250))
host_ip=10.214.$octet.1
peer_ip=10.214.$octet.2

cleanup() {
    ip link del "$host_if" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "$ns"
ip link add "$host_if" type veth peer name "$peer_if"
ip link set "$peer_if" netns "$ns"
ip addr add "$host_ip/24" dev "$host_if"
ip link set "$host_if" mtu "$mtu" up
ip -n "$ns" addr add "$peer_ip/24" dev "$peer_if"
ip -n "$ns" link set "$peer_if" mtu "$mtu" up
ip -n "$ns" link set lo up

if [ -z "${BENCH:-}" ]; then
    cargo build --release -q -p rixl-tcp --example tcp_bench
    BENCH=${CARGO_TARGET_DIR:-target}/release/examples/tcp_bench
fi
echo "link: veth $host_if ($host_ip) <-> $ns/$peer_if ($peer_ip), MTU $mtu"
for r in $(seq 1 "$rounds"); do
    echo "== round $r: RIXL"
    RIXL_TCP_BENCH_NETNS=$ns RIXL_TCP_BENCH_ADDR=$peer_ip \
        flock /tmp/rixl-bench.lock "$BENCH" "$@"
    if [ -x "$nixl_py" ]; then
        echo "== round $r: NIXL"
        RIXL_TCP_BENCH_NETNS=$ns RIXL_TCP_BENCH_TARGET_DEV=$peer_if UCX_NET_DEVICES=$host_if \
            UCX_TLS=tcp flock /tmp/rixl-bench.lock "$nixl_py" crates/rixl-tcp/bench/nixl_tcp_compare.py
    else
        echo "== round $r: NIXL skipped: $nixl_py not found (NIXL_PY=python with nixl-cu12==1.5.1)"
    fi
done
